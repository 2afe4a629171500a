"""`python -m modeling_eomt.train`: see `modeling_eomt.training.train`."""

from .training.train import main

if __name__ == "__main__":
    main()
