"""`python -m training`: train a caption model (see training.train). Bad data ends the run with one line naming
the file, column and row, and exit status 2."""

import sys

from training.data import DataError
from training.train import main

if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        print(f"python -m training: data error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
