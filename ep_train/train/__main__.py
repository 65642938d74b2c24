import sys

from ep_train.train.trainer import NonFiniteLossError, main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, NonFiniteLossError) as e:
        print(f"ep-train train: error: {e}", file=sys.stderr)
        sys.exit(2)
