//! `usernsguard classify`: the pod-failure classifier as a filter, so an operator can run
//! `kubectl get events -o jsonpath='{range .items[*]}{.message}{"\n"}{end}' | usernsguard classify`
//! and see which failures are user-namespace ones, with the same verdicts the agent counts.
//!
//! Input is read as bytes: event messages can carry a runtime's stderr cut mid-character,
//! and one line can be megabytes long. Every input line yields exactly one output line, so
//! the output can be pasted next to the input (`paste`), and an empty line yields
//! `unrelated`.

use std::io::{self, BufRead, BufReader, Read, Write};

use anyhow::Context;
use usernsguard_runtime::classify::classify_bytes;

/// Arguments of `usernsguard classify` (none yet: input is stdin, output is stdout).
#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {}

/// Runs the filter on the process's stdin and stdout.
pub fn run(_args: &ClassifyArgs) -> anyhow::Result<()> {
    let stdout = io::stdout();
    let input = BufReader::with_capacity(64 * 1024, io::stdin().lock());
    match filter(input, io::BufWriter::new(stdout.lock())) {
        // The reader went away (`| head`): not an error of ours.
        Err(FilterError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(FilterError::Read(e)) => Err(e).context("reading failure messages from stdin"),
        Err(FilterError::Write(e)) => Err(e).context("writing reason codes to stdout"),
        Ok(()) => Ok(()),
    }
}

/// Which side of the filter failed: read errors and write errors need different handling
/// (a closed stdout is normal for a filter, a failing stdin is not).
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("reading input: {0}")]
    Read(#[source] io::Error),
    #[error("writing output: {0}")]
    Write(#[source] io::Error),
}

/// Classifies each line of `input` and writes its reason code as one line of `output`.
///
/// Output is flushed whenever the input has nothing more buffered, i.e. before the next
/// read could block: piped batches are written in bulk, while
/// `kubectl get events --watch | ...` shows each verdict as soon as its message arrives.
pub fn filter<R: Read>(mut input: BufReader<R>, mut output: impl Write) -> Result<(), FilterError> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = input.read_until(b'\n', &mut line).map_err(FilterError::Read)?;
        if n == 0 {
            break;
        }
        let message = line.strip_suffix(b"\n").unwrap_or(&line);
        let message = message.strip_suffix(b"\r").unwrap_or(message);
        let reason = classify_bytes(message);
        output
            .write_all(reason.as_str().as_bytes())
            .map_err(FilterError::Write)?;
        output.write_all(b"\n").map_err(FilterError::Write)?;
        if input.buffer().is_empty() {
            output.flush().map_err(FilterError::Write)?;
        }
    }
    output.flush().map_err(FilterError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_filter(input: &[u8]) -> String {
        let mut out = Vec::new();
        filter(BufReader::new(input), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn one_code_per_line_including_empty_crlf_and_unterminated_lines() {
        let input = b"OOMKilled\r\n\nerror mounting \"sysfs\" to rootfs at \"/sys\": operation not permitted\r\nUSER namespaces aren't enabled in the kernel";
        assert_eq!(
            run_filter(input),
            "unrelated\nunrelated\nsysfs_mount_eperm\nuserns_unsupported\n"
        );
    }

    #[test]
    fn empty_input_gives_empty_output() {
        assert_eq!(run_filter(b""), "");
    }

    #[test]
    fn non_utf8_bytes_do_not_stop_the_filter() {
        let mut input = b"\xff\xfe mqueue setxattr: operation not permitted\n".to_vec();
        input.extend_from_slice(b"\xc3\n");
        assert_eq!(run_filter(&input), "mqueue_setxattr\nunrelated\n");
    }

    #[test]
    fn read_errors_are_reported_as_read_errors() {
        struct Failing;
        impl io::Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let err = filter(BufReader::new(Failing), Vec::new()).unwrap_err();
        assert!(matches!(err, FilterError::Read(_)), "{err:?}");
    }
}
