"""Tests for secure-echo."""
