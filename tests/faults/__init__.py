"""Fault harnesses shared by the durability and partition tests (issue #14).

``checker``   compare what publishers were acknowledged with what each place holds.
``lazyfs``    a FUSE filesystem that loses every write not fsynced, on demand.
``powerloss`` publish, kill -9, drop unsynced writes, restart, check (a runnable script).
"""
