"""The ground floor: helpers every layer may import (paths, errors, the CLI's error exit).

Nothing here imports another part of the project.
"""
