//! End-to-end tests of the `custos` binary: real processes, real signals, real files.

mod access;
mod archive;
mod cli;
mod cluster;
mod console;
mod contract;
mod crash;
mod eval;
mod evidence;
mod hardening;
mod kafka_tls;
mod lastid;
mod metrics;
mod openapi;
mod otlp;
mod query;
mod query_node;
mod respond;
mod sdk;
mod stages;
mod support;
mod vaultysclaw;
mod witness;
