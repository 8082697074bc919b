//! Stand-alone probe payload, so the runtime crate's integration tests and benches can run
//! probe containers without the `usernsguard` binary. In production the agent binary is the
//! payload (`usernsguard __probe-payload`); both call the same function.
//!
//! `--hang` makes the payload never finish, which is how the tests drive a real runtime
//! into the timeout path (container processes, cgroups and state left to clean up).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--hang") {
        loop {
            std::thread::park();
        }
    }
    std::process::exit(usernsguard_runtime::probe::payload::main(&args));
}
