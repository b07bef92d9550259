"""Roles as separate processes: prefill and decode instances behind a router (``--role``)."""
