//! Integration tests of ingest over real HTTP on loopback, with a real store.

mod chain;
mod pipeline;
mod reasons;
mod registry;
mod restart;
mod support;
