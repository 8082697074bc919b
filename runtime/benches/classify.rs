//! Classifier throughput on one core.
//!
//! `typical_mix` classifies every message of the table in `tests/fixtures/classify.tsv`
//! (real kubelet/CRI/OCI failure messages, half of them unrelated, 10 to 700 bytes) and
//! reports messages per second; the target is at least 500,000/s. `huge_line_4MiB` shows
//! the cost stays linear on a multi-megabyte line.
//!
//! Each benchmark runs twice: `wall/...` with criterion's wall clock, and `cpu/...` with
//! the benchmark thread's own CPU time. On a shared machine (CI, several builds on two
//! cores) the wall clock includes time the thread spent descheduled; the CPU-time figure
//! is the per-core throughput the target is about.

use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use usernsguard_runtime::classify::{classify, classify_bytes};

const TABLE: &str = include_str!("../tests/fixtures/classify.tsv");

fn table_messages() -> Vec<&'static str> {
    TABLE
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.splitn(3, '\t').nth(2))
        .collect()
}

fn huge_line() -> Vec<u8> {
    let mut line = vec![b'x'; 4 << 20];
    line.extend_from_slice(b" error mounting \"sysfs\" to rootfs at \"/sys\": operation not permitted");
    line
}

fn benches<M: Measurement + 'static>(c: &mut Criterion<M>, prefix: &str) {
    let messages = table_messages();
    assert!(
        messages.len() >= 40,
        "fixture table shrank to {} rows",
        messages.len()
    );
    let mut group = c.benchmark_group(prefix);
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.bench_function("typical_mix", |b| {
        b.iter(|| {
            for m in &messages {
                black_box(classify(black_box(m)));
            }
        })
    });
    let line = huge_line();
    group.throughput(Throughput::Bytes(line.len() as u64));
    group.sample_size(20);
    group.bench_function("huge_line_4MiB", |b| {
        b.iter(|| black_box(classify_bytes(black_box(&line))))
    });
    group.finish();
}

fn wall(c: &mut Criterion) {
    benches(c, "wall");
}

fn cpu(c: &mut Criterion<ThreadCpuTime>) {
    benches(c, "cpu");
}

/// CPU time consumed by the calling thread (`CLOCK_THREAD_CPUTIME_ID`).
#[derive(Debug)]
struct ThreadCpuTime;

fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel
    // supports since Linux 2.6.12.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_now()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_now().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, d: &Duration) -> f64 {
        d.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

/// Formats nanoseconds of CPU time and derived throughputs (elements/s, MiB/s).
struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, typical_ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical_ns < 1e3 {
            (1.0, "ns")
        } else if typical_ns < 1e6 {
            (1e-3, "µs")
        } else if typical_ns < 1e9 {
            (1e-6, "ms")
        } else {
            (1e-9, "s")
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }

    fn scale_throughputs(&self, _typical: f64, throughput: &Throughput, values: &mut [f64]) -> &'static str {
        let (per_iter, denominator, unit) = match *throughput {
            Throughput::Elements(n) => (n as f64, 1e3, "Kelem/s"),
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) => (n as f64, 1024.0 * 1024.0, "MiB/s"),
        };
        values
            .iter_mut()
            .for_each(|v| *v = per_iter * (1e9 / *v) / denominator);
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

criterion_group!(wall_benches, wall);
criterion_group! {
    name = cpu_benches;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = cpu
}
criterion_main!(wall_benches, cpu_benches);
