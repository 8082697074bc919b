//! One module per subcommand, each holding only its arguments and the wiring that turns
//! them into calls of the domain modules (`node`, `controller`, `crd`, `http`).

pub mod agent;
pub mod classify;
pub mod controller;
pub mod crds;
pub mod install;
pub mod selftest;
