"""EdgeFleet wire contract: generated protobuf modules plus pure helpers.

Both the agent and the controller import this package; it imports nothing but
protobuf and the standard library.
"""

CONTRACT_VERSION = "v1"
