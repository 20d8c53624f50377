"""Migrations DBAs apply, shipped as package data."""
