"""Training, calibration, export and the architecture benchmark. Torch lives here, and only here.

Nothing that serves (service, web, inference, store) imports this package.
"""
