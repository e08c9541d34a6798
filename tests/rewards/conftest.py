"""Tiny reward folders, written once per session in each reward's real layout."""
from __future__ import annotations
