"""Faithful fakes of peers that cannot run here, written from their protocol documentation."""
