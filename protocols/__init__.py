"""Field-protocol adapters: transports (connectors) and payload codecs (converters).

Nothing here knows about the database: an adapter turns traffic into
:class:`protocols.uplink.Frame` objects and hands them to a sink, and acknowledges upstream only
when the sink says they are durable.
"""
