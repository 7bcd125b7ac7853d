//! One module per subcommand.

pub(crate) mod agent;
pub(crate) mod bench;
pub(crate) mod client;
pub(crate) mod demo;
pub(crate) mod emit;
pub(crate) mod fleet;
pub(crate) mod proof;
pub(crate) mod serve;
pub(crate) mod verify;
