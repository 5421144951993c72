"""Settings: the values (``values``), the option table and its parsers (``options``), the YAML
configuration file (``file``) and per-route policy from Envoy (``routes``)."""
