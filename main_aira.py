"""AIRA (Activation-Informed Low-Rank Adaptation, Li et al., ICCV 2025) on few-shot CLIP with the paper's defaults.

Same flags as ``main.py`` with ``--method aira`` fixed.
"""
from main import main

if __name__ == "__main__":
    main(method="aira")
