"""Reading and writing images, datasets and the example data."""
