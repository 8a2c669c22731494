"""`python -m training`: train the default model's projector."""

from training.train import main

if __name__ == "__main__":
    main()
