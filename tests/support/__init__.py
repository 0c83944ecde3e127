"""Test support, not collected: tiny architectures (archs), composed configs (compose), dispatch probes
(probes), and scripts run in their own processes (launch/)."""
