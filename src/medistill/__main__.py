"""``python -m medistill`` (also what ``torchrun -m medistill train ...`` runs)."""

from medistill.cli import main

main()
