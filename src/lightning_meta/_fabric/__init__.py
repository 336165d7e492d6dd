"""Deferred models in Lightning Fabric (``lm.fabric_setup``); imports nothing itself."""
