"""Shipped example specs (package data: `mlpfuse demo` reads smollm2-demo.yaml from here)."""
