"""`rtloop serve` and its client: OpenVLA behind openpi's websocket protocol (see docs-serve.md)."""
