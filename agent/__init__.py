"""EdgeFleet device agent: keeps the device's models where the controller wants them."""

__version__ = "0.1.0"
