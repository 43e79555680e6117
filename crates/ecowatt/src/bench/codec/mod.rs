//! `ecowatt bench codec`: bytes per sample of the telemetry codecs against
//! general-purpose compressors and the order-0 entropy floor, on a realistic
//! dataset of our own ([`dataset`]) or on a user's recorded CSV, with every
//! batch checked to decode back exactly; and encode/decode speed on one core.

pub mod dataset;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use ecowatt_proto::codec::{self, CODEC_V1, CODEC_V2, Sample};

/// Arguments of `ecowatt bench codec`.
#[derive(Debug, clap::Args)]
pub struct CodecArgs {
    /// Samples per batch, one table each (60 = 5 min at a 5 s poll).
    #[arg(long, value_delimiter = ',', default_value = "60,180,720",
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub batch: Vec<u16>,
    /// Seed of the generated dataset.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Measure a recorded log instead: CSV with a header `unix_ms,r0,r1,...`
    /// (raw register values, any subset of r0..r9 in address order), one sample per line.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

/// Total bytes of one dataset at one batch size, per encoding.
#[derive(Debug, Default, Clone, Copy)]
struct Sizes {
    v1: usize,
    v2: usize,
    deflate: usize,
    zstd3: usize,
    zstd19: usize,
    columns_zstd: usize,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// What a naive device sends: seq u64, time u64 and each register u16, big-endian.
fn raw_bytes(chunk: &[Sample]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(chunk.len() * 36);
    for s in chunk {
        bytes.extend_from_slice(&s.seq.to_be_bytes());
        bytes.extend_from_slice(&s.unix_ms.to_be_bytes());
        for v in &s.values {
            bytes.extend_from_slice(&v.to_be_bytes());
        }
    }
    bytes
}

/// The classic baseline: each column delta-coded, zigzag varints, column after column, zstd -19.
fn columns_bytes(chunk: &[Sample], width: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunk.len() * (width + 4));
    let mut column = |f: &dyn Fn(&Sample) -> i64| {
        let mut prev = 0;
        for s in chunk {
            put_varint(&mut out, zigzag(f(s) - prev));
            prev = f(s);
        }
    };
    column(&|s| s.seq as i64);
    column(&|s| s.unix_ms as i64);
    for r in 0..width {
        column(&|s| i64::from(s.values[r]));
    }
    out
}

fn measure(samples: &[Sample], mask: u16, batch: usize) -> anyhow::Result<Sizes> {
    let width = mask.count_ones() as usize;
    let mut z = Sizes::default();
    for chunk in samples.chunks(batch) {
        for (version, total) in [(CODEC_V1, &mut z.v1), (CODEC_V2, &mut z.v2)] {
            let encoded = codec::encode_as(version, mask, chunk)
                .with_context(|| format!("codec v{version} refused a batch"))?;
            let decoded = codec::decode(&encoded)?;
            if decoded.samples != chunk || decoded.registers != mask {
                bail!("codec v{version}: a batch from seq {} does not decode back", chunk[0].seq);
            }
            *total += encoded.len();
        }
        let raw = raw_bytes(chunk);
        z.deflate += miniz_oxide::deflate::compress_to_vec(&raw, 6).len();
        z.zstd3 += zstd::bulk::compress(&raw, 3)?.len();
        z.zstd19 += zstd::bulk::compress(&raw, 19)?.len();
        z.columns_zstd += zstd::bulk::compress(&columns_bytes(chunk, width), 19)?.len();
    }
    Ok(z)
}

/// Order-0 entropy of each column's deltas over the whole trace (seq, time,
/// every register), in bytes per sample: what a coder that knows the global
/// delta distributions but nothing else would spend.
fn entropy_floor(samples: &[Sample], width: usize) -> f64 {
    use std::collections::HashMap;
    let n = samples.len().saturating_sub(1);
    if n == 0 {
        return 0.0;
    }
    let entropy = |f: &dyn Fn(&Sample) -> i64| {
        let mut counts: HashMap<i64, u32> = HashMap::new();
        for w in samples.windows(2) {
            *counts.entry(f(&w[1]) - f(&w[0])).or_default() += 1;
        }
        counts
            .values()
            .map(|&c| {
                let p = f64::from(c) / n as f64;
                -p * p.log2()
            })
            .sum::<f64>()
    };
    let mut bits = entropy(&|s| s.seq as i64) + entropy(&|s| s.unix_ms as i64);
    for r in 0..width {
        bits += entropy(&|s| i64::from(s.values[r]));
    }
    bits * n as f64 / samples.len() as f64 / 8.0
}

/// Reads a recorded log: `unix_ms,r0,...` header, raw values; `seq` is the line order.
pub fn read_csv(path: &Path) -> anyhow::Result<(u16, Vec<Sample>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) =
        lines.next().context("the CSV is empty: it needs a header `unix_ms,r0,...`")?;
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    if names.first() != Some(&"unix_ms") || names.len() < 2 {
        bail!("CSV header must be `unix_ms,r0,r1,...` (raw register columns), found `{header}`");
    }
    let mut mask = 0u16;
    let mut last = None;
    for name in &names[1..] {
        let r: u16 = name
            .strip_prefix('r')
            .and_then(|n| n.parse().ok())
            .filter(|r| *r <= 9)
            .with_context(|| format!("CSV column `{name}` is not a register r0..r9"))?;
        if last.is_some_and(|l| r <= l) {
            bail!("CSV register columns must be in address order without repeats (at `{name}`)");
        }
        last = Some(r);
        mask |= 1 << r;
    }
    let mut samples = Vec::new();
    for (i, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != names.len() {
            bail!("line {}: {} fields, the header has {}", i + 1, fields.len(), names.len());
        }
        let unix_ms: u64 =
            fields[0].parse().ok().filter(|ms| *ms < codec::v2::MS_LIMIT).with_context(|| {
                format!("line {}: `{}` is not a time in Unix ms", i + 1, fields[0])
            })?;
        let values = fields[1..]
            .iter()
            .map(|f| f.parse::<u16>())
            .collect::<Result<Vec<u16>, _>>()
            .with_context(|| format!("line {}: a register value is not 0..=65535", i + 1))?;
        samples.push(Sample { seq: samples.len() as u64 + 1, unix_ms, values });
    }
    if samples.is_empty() {
        bail!("the CSV has a header but no samples");
    }
    Ok((mask, samples))
}

/// Encode and decode rate of a codec, samples per second on one core.
fn speed(version: u8, mask: u16, samples: &[Sample], batch: usize) -> (f64, f64) {
    let encoded: Vec<Vec<u8>> =
        samples.chunks(batch).map(|c| codec::encode_as(version, mask, c).expect("valid")).collect();
    let time = |f: &dyn Fn()| {
        let started = Instant::now();
        let mut rounds = 0u32;
        while rounds < 3 || started.elapsed().as_secs_f64() < 0.5 {
            f();
            rounds += 1;
        }
        samples.len() as f64 * f64::from(rounds) / started.elapsed().as_secs_f64()
    };
    let enc = time(&|| {
        for c in samples.chunks(batch) {
            std::hint::black_box(codec::encode_as(version, mask, c).unwrap());
        }
    });
    let dec = time(&|| {
        for e in &encoded {
            std::hint::black_box(codec::decode(e).unwrap());
        }
    });
    (enc, dec)
}

/// Runs the bench and prints its tables.
pub fn run(args: CodecArgs) -> anyhow::Result<()> {
    let data: Vec<(String, u16, Vec<Sample>)> = match &args.csv {
        Some(path) => {
            let (mask, samples) = read_csv(path)?;
            vec![(path.display().to_string(), mask, samples)]
        }
        None => dataset::traces()
            .into_iter()
            .map(|(name, t)| (name.to_string(), 0x03FF, dataset::generate(t, args.seed)))
            .collect(),
    };
    let source = match &args.csv {
        Some(_) => "a recorded log".to_string(),
        None => format!("the realistic dataset, seed {}", args.seed),
    };
    outln!(
        "Telemetry codecs on {source}: bytes per sample (every v1 and v2 batch decoded back exactly)"
    );
    outln!(
        "  deflate and zstd compress each batch as raw rows (seq u64, ms u64, registers u16); delta+zstd is each\n  column delta-coded as zigzag varints, zstd -19; the floor is the order-0 entropy of each column's deltas"
    );
    for &batch in &args.batch {
        let batch = usize::from(batch);
        outln!("batch of {batch}:");
        outln!(
            "  {:<30} {:>6} {:>6} {:>7} {:>7} {:>7} {:>10} {:>6} {:>6} {:>8}",
            "data",
            "v1",
            "v2",
            "deflate",
            "zstd-3",
            "zstd-19",
            "delta+zstd",
            "floor",
            "v2/v1",
            "v2/floor"
        );
        for (name, mask, samples) in &data {
            let z = measure(samples, *mask, batch)?;
            let n = samples.len() as f64;
            let per = |b: usize| b as f64 / n;
            let floor = entropy_floor(samples, mask.count_ones() as usize);
            outln!(
                "  {:<30} {:>6.2} {:>6.2} {:>7.2} {:>7.2} {:>7.2} {:>10.2} {:>6.2} {:>6.2} {:>8.2}",
                name,
                per(z.v1),
                per(z.v2),
                per(z.deflate),
                per(z.zstd3),
                per(z.zstd19),
                per(z.columns_zstd),
                floor,
                z.v2 as f64 / z.v1 as f64,
                per(z.v2) / floor
            );
        }
    }
    let (name, mask, samples) = data.iter().max_by_key(|(_, _, s)| s.len()).expect("one dataset");
    let batch = usize::from(args.batch[0]);
    outln!("speed, one core, batches of {batch} ({name}, {} samples):", samples.len());
    for version in [CODEC_V1, CODEC_V2] {
        let (enc, dec) = speed(version, *mask, samples, batch);
        outln!("  codec v{version}: encode {enc:>10.0} samples/s   decode {dec:>10.0} samples/s");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_csv_is_read_and_bad_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.csv");
        std::fs::write(&path, "unix_ms,r0,r9\n1800000000000,2301,1500\n1800000005012,2302,1490\n")
            .unwrap();
        let (mask, samples) = read_csv(&path).unwrap();
        assert_eq!(mask, 0x0201);
        assert_eq!(
            samples[1],
            Sample { seq: 2, unix_ms: 1_800_000_005_012, values: vec![2302, 1490] }
        );
        let z = measure(&samples, mask, 60).unwrap();
        assert!(z.v2 > 0 && z.v1 > 0);
        for (text, why) in [
            ("time,r0\n1,2\n", "header"),
            ("unix_ms,r9,r0\n1,2,3\n", "address order"),
            ("unix_ms,r10\n1,2\n", "r0..r9"),
            ("unix_ms,r0\n1,70000\n", "line 2"),
            ("unix_ms,r0\n1\n", "line 2: 1 fields"),
            ("unix_ms,r0\n", "no samples"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", read_csv(&path).unwrap_err());
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_floor_of_constant_data_is_zero_and_of_a_coin_one_bit() {
        let s: Vec<Sample> =
            (0..1000).map(|i| Sample { seq: i + 1, unix_ms: 5_000 * i, values: vec![7] }).collect();
        assert_eq!(entropy_floor(&s, 1), 0.0);
        let mut rng = dataset::Rng::new(1, 1);
        let mut v = 0i64;
        let coin: Vec<Sample> = (0..20_000)
            .map(|i| {
                v += if rng.chance(0.5) { 1 } else { -1 };
                Sample { seq: i + 1, unix_ms: 5_000 * i, values: vec![(1000 + v) as u16] }
            })
            .collect();
        let floor = entropy_floor(&coin, 1);
        assert!((floor - 1.0 / 8.0).abs() < 0.002, "{floor}");
    }
}
