from .cli import main

# Guarded: spawned helper processes may import the main module again (python -m lipcli, torchrun -m lipcli).
if __name__ == "__main__":
    main()
