"""The seam between the mesh and nats.py (issue #24): every nats.py call is in here.

``port.JetStreamPort`` is what the client composes (``client.port``) and what services
and operator modules call; ``types`` re-exports the nats.py names the rest may hold.
Nothing outside this package imports ``nats`` (``tests/test_seam.py``). Importing this
package loads nothing else, so that the stores' modules can use its parts without a
circle.
"""
