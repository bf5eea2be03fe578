"""Figures and static HTML reports a person can look at."""
