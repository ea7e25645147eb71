"""snmp service."""
