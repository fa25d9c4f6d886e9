"""The bottom layer: user errors, weight-file I/O, distributed helpers, schedules, metric averaging
and flag parsing. Imports nothing else of the project, so every other package may import it."""
