//! Integration tests of the store: one binary, several modules.

mod merkle;
mod partitions;
mod resources;
mod support;
mod tamper;
mod vectors;

mod wal;
