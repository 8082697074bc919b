//! End-to-end test of `usernsguard classify`: the built binary, real pipes.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_usernsguard");

fn classify_all(input: &[u8]) -> (String, String, bool) {
    let mut child = Command::new(BIN)
        .arg("classify")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning usernsguard classify");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // Write from another thread: the child's output pipe could fill up otherwise.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn classifies_piped_messages_one_code_per_line() {
    let mut input = Vec::new();
    input.extend_from_slice(b"runc create failed: unable to start container process: error during container init: error mounting \"mqueue\" to rootfs at \"/dev/mqueue\": setxattr /run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs/dev/mqueue: operation not permitted\n");
    input.extend_from_slice(b"Back-off pulling image \"docker.io/library/nginx:1.0\"\n");
    input.extend_from_slice(b"\n");
    input.extend_from_slice(b"\xff\xfe\xfd not utf-8 at all\r\n");
    // A 3 MiB line whose verdict is decided by its last bytes.
    input.extend(std::iter::repeat_n(b'x', 3 << 20));
    input
        .extend_from_slice(b" can't set `spec.hostUsers: false`, runtime does not support user namespaces\n");
    input.extend_from_slice(b"Failed to create pod sandbox: rpc error: code = Unknown desc = creating pod sandbox with name \"k8s_x\": not enough unused IDs in user namespace");

    let (stdout, stderr, ok) = classify_all(&input);
    assert!(ok, "usernsguard classify failed: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "mqueue_setxattr",
            "unrelated",
            "unrelated",
            "unrelated",
            "userns_unsupported",
            "subid_unavailable"
        ]
    );
}

#[test]
fn empty_stdin_prints_nothing_and_succeeds() {
    let (stdout, stderr, ok) = classify_all(b"");
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "");
}

/// `kubectl get events --watch | usernsguard classify` must show each verdict when its
/// message arrives, not when stdin closes.
#[test]
fn answers_each_line_before_stdin_is_closed() {
    let mut child = Command::new(BIN)
        .arg("classify")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning usernsguard classify");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for _ in 0..2 {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            tx.send(line).unwrap();
        }
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).unwrap();
        rest
    });

    stdin
        .write_all(b"USER namespaces aren't enabled in the kernel\n")
        .unwrap();
    stdin.flush().unwrap();
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no answer while stdin stays open");
    assert_eq!(first, "userns_unsupported\n");

    stdin.write_all(b"OOMKilled\n").unwrap();
    stdin.flush().unwrap();
    let second = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no answer to the second line");
    assert_eq!(second, "unrelated\n");

    drop(stdin);
    assert_eq!(reader.join().unwrap(), "");
    assert!(child.wait().unwrap().success());
}

#[test]
fn unknown_subcommand_is_rejected_with_a_usage_error() {
    let out = Command::new(BIN).arg("clasify").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("clasify"), "{stderr}");
    assert!(
        stderr.contains("classify"),
        "clap should suggest the right name: {stderr}"
    );
}
