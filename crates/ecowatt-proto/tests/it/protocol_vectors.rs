//! The test vectors of `docs/protocol.md`, kept in `docs/protocol-vectors.json`:
//! this test fails if the code and the file disagree (run with
//! `ECOWATT_WRITE_VECTORS=1` to rewrite the file after a deliberate change).
//! `docs/check_vectors.py` checks the same file with Python's `cryptography`.

use ecowatt_proto::codec::{self, Sample};
use ecowatt_proto::hex::encode_upper as hex;
use ecowatt_proto::messages::{ConfigState, DeviceCommand, Operation, SyncRequest, SyncResponse};
use ecowatt_proto::seal::{self, Direction, Header, Keys};

const KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

fn vectors() -> String {
    let keys = Keys::derive(&KEY);
    let request_header =
        Header { msg_type: 1, direction: Direction::Up, key_version: 1, device_id: 7, counter: 1 };
    let request_plain = SyncRequest {
        wait_ms: 25_000,
        applied: Some(ConfigState {
            version: 1,
            poll_interval_ms: 5_000,
            upload_interval_ms: 900_000,
            registers: 0x03FF,
        }),
        rejected: vec![],
        results: vec![],
        firmware: "1.0.0".into(),
        ota: None,
        control: None,
        schedule: None,
        codecs: None,
        delivery: None,
    }
    .encode();
    let request = seal::seal(&keys, &request_header, None, &request_plain);
    let answer_header = Header {
        msg_type: 2,
        direction: Direction::Down,
        key_version: 1,
        device_id: 7,
        counter: 1,
    };
    let answer_plain = SyncResponse {
        server_time_ms: 1_800_000_000_000,
        config: None,
        commands: vec![DeviceCommand {
            id: 5,
            op: Operation::Write { register: 8, value: 30 },
            expires_ms: 1_800_000_600_000,
        }],
        update: None,
        control: None,
        schedule: None,
        codecs: None,
        delivery: None,
    }
    .encode();
    let answer = seal::seal(&keys, &answer_header, Some(1), &answer_plain);
    // Three samples of Vac1 and Pac (mask 0x0201), 5 s apart, seq 10..=12.
    let samples: Vec<Sample> = [(2308u16, 1500u16), (2309, 1500), (2309, 1490)]
        .iter()
        .enumerate()
        .map(|(i, &(v, p))| Sample {
            seq: 10 + i as u64,
            unix_ms: 1_800_000_000_000 + 5_000 * i as u64,
            values: vec![v, p],
        })
        .collect();
    let batch = codec::encode(0x0201, &samples).unwrap();
    let (v2_samples, v2_batch) = v2_vector();
    // An image of 2,500 bytes in chunks of 1 KiB: two whole chunks and a short one.
    let image: Vec<u8> = (0..2_500u32).map(|i| (i * 31 % 256) as u8).collect();
    let delivery = ecowatt_proto::delivery::Delivery::new(&KEY, &TOKEN, 10, image.len() as u64);
    let stream = delivery.stream_range(&image, 0, delivery.stream_len() - 1);
    let v2_rows: Vec<String> = v2_samples
        .iter()
        .map(|s| {
            let values: Vec<String> = s.values.iter().map(|v| v.to_string()).collect();
            format!("[{}, {}, {}]", s.seq, s.unix_ms, values.join(", "))
        })
        .collect();
    format!(
        r#"{{
  "device_key": "{}",
  "up_key": "{}",
  "down_key": "{}",
  "request": {{
    "header": "{}",
    "nonce": "{}",
    "aad": "{}",
    "plaintext": "{}",
    "envelope": "{}"
  }},
  "answer": {{
    "answers_counter": 1,
    "header": "{}",
    "nonce": "{}",
    "aad": "{}",
    "plaintext": "{}",
    "envelope": "{}"
  }},
  "codec_batch": {{
    "registers": "0x0201",
    "samples": [[10, 1800000000000, 2308, 1500], [11, 1800000005000, 2309, 1500], [12, 1800000010000, 2309, 1490]],
    "encoded": "{}"
  }},
  "codec_v2_batch": {{
    "registers": "0x0301",
    "samples": [{}],
    "encoded": "{}"
  }},
  "firmware_delivery": {{
    "token": "{}",
    "chunk_log2": 10,
    "image": "{}",
    "key": "{}",
    "stream": "{}"
  }}
}}
"#,
        hex(&KEY),
        hex(&seal::derive_key(&KEY, Direction::Up)),
        hex(&seal::derive_key(&KEY, Direction::Down)),
        hex(&request_header.encode()),
        hex(&request_header.nonce()),
        hex(&request_header.encode()),
        hex(&request_plain),
        hex(&request),
        hex(&answer_header.encode()),
        hex(&answer_header.nonce()),
        hex(&[&answer_header.encode()[..], &1u64.to_be_bytes()].concat()),
        hex(&answer_plain),
        hex(&answer),
        hex(&batch),
        v2_rows.join(", "),
        hex(&v2_batch),
        hex(&TOKEN),
        hex(&image),
        hex(&ecowatt_proto::delivery::key(&KEY, &TOKEN)),
        hex(&stream),
    )
}

/// An offer's token for the firmware delivery vector.
const TOKEN: [u8; 16] = *b"offer-token-0001";

/// 70 samples of Vac1, Pow and Pac (two blocks per column): read jitter and a
/// late read, a missed seq, grid noise with a spike, a constant limit with a
/// step, and a power ramp: every block model and both packings occur.
fn v2_vector() -> (Vec<Sample>, Vec<u8>) {
    let mut seq = 100;
    let samples: Vec<Sample> = (0..70u64)
        .map(|i| {
            seq += if i == 30 { 2 } else { 1 };
            let jitter = (i * 37 + 11) % 45 + if i == 50 { 1_000 } else { 0 };
            let noise = [0u16, 3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5][i as usize % 12];
            let vac = if i == 20 { 0xFFFF } else { 2300 + noise };
            let pow = if i < 40 { 100 } else { 60 };
            let pac = if i < 64 { 1_500 + (i * i) as u16 } else { 3_000 };
            Sample {
                seq,
                unix_ms: 1_800_000_000_000 + 5_000 * i + jitter,
                values: vec![vac, pow, pac],
            }
        })
        .collect();
    let batch = codec::encode_as(codec::CODEC_V2, 0x0301, &samples).unwrap();
    (samples, batch)
}

#[test]
fn vectors_match_docs() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol-vectors.json");
    let now = vectors();
    if std::env::var_os("ECOWATT_WRITE_VECTORS").is_some() {
        std::fs::write(path, &now).unwrap();
    }
    let stored = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(
        stored, now,
        "docs/protocol-vectors.json is stale: rerun with ECOWATT_WRITE_VECTORS=1 if the change is deliberate"
    );
}
