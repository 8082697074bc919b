//! Stand-alone probe payload, so the runtime crate's integration tests and benches can run
//! probe containers without the `usernsguard` binary. In production the agent binary is the
//! payload (`usernsguard __probe-payload`); both call the same function.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(usernsguard_runtime::probe::payload::main(&args));
}
