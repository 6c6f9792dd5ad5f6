"""Sensor sources behind one small interface (:class:`agent.sensors.base.Source`).

Heavy libraries (OpenCV, sounddevice) are imported only when a tenant's source
needs them, so the agent starts without them when no tenant does.
"""
