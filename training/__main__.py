"""`python -m training`: train a caption model (see training.train)."""

from training.train import main

if __name__ == "__main__":
    main()
