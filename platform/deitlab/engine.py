"""`python -m deitlab.engine SPEC`: one experiment on this machine with torch + timm only (bare GPU boxes); the loop
itself is deitlab.core.engine."""
from deitlab.core.engine import main

if __name__ == "__main__":
    raise SystemExit(main())
