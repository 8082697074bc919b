//! The `usernsguard` binary is its own probe payload: probe containers bind-mount it and run
//! its hidden `__probe-payload` subcommand, so no image is needed and the payload is always
//! the version of the code that judges its output.

/// The hidden subcommand probe containers run.
pub const PROBE_PAYLOAD_COMMAND: &str = "__probe-payload";

/// The payload for probe containers: the running binary, told to observe and report.
pub fn own_payload() -> std::io::Result<usernsguard_runtime::bundle::Payload> {
    Ok(usernsguard_runtime::bundle::Payload {
        host_path: std::env::current_exe()?,
        args: vec![PROBE_PAYLOAD_COMMAND.into()],
    })
}

/// Where the usernsguard image keeps this binary: the `cri-pod` probe container runs it.
pub const IMAGE_BINARY: &str = "/usr/local/bin/usernsguard";

/// The `cri-pod` probe container's command: this binary in the agent's image, observing.
pub fn image_command() -> Vec<String> {
    vec![IMAGE_BINARY.into(), PROBE_PAYLOAD_COMMAND.into()]
}
