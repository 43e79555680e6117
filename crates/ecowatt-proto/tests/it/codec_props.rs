//! Properties of the telemetry codecs: decode(encode(x)) == x for arbitrary
//! batches (every register subset, u16 extremes, noise, spikes, seq gaps,
//! jittered and jumping times), for v1 and v2; arbitrary bytes never panic
//! a decoder, and whatever v2 decodes re-encodes to the same samples.

use ecowatt_proto::codec::{self, CODEC_V1, CODEC_V2, Sample, v2};
use proptest::prelude::*;

/// One register's values: constant, noisy around a level, extremes, a random
/// walk, or anything, with spikes sprinkled in.
fn column(n: usize) -> impl Strategy<Value = Vec<u16>> {
    let shape = prop_oneof![
        any::<u16>().prop_map(move |v| vec![v; n]),
        (any::<u16>(), 0u16..64).prop_flat_map(move |(level, spread)| {
            proptest::collection::vec(0..=spread, n)
                .prop_map(move |d| d.iter().map(|x| level.wrapping_add(*x)).collect())
        }),
        proptest::collection::vec(
            prop_oneof![Just(0u16), Just(u16::MAX), Just(1), Just(u16::MAX - 1)],
            n
        ),
        (any::<u16>(), proptest::collection::vec(-300i32..300, n)).prop_map(|(start, steps)| {
            let mut v = i32::from(start);
            steps
                .iter()
                .map(|s| {
                    v = (v + s).clamp(0, 65_535);
                    v as u16
                })
                .collect()
        }),
        proptest::collection::vec(any::<u16>(), n),
    ];
    (shape, proptest::collection::vec((0..n, any::<u16>()), 0..4)).prop_map(|(mut v, spikes)| {
        for (i, x) in spikes {
            v[i] = x;
        }
        v
    })
}

fn batch() -> impl Strategy<Value = (u16, Vec<Sample>)> {
    (1u16..=0x03FF, prop_oneof![1usize..4, 1usize..200, 60usize..=60, 300usize..700])
        .prop_flat_map(|(mask, n)| {
            let width = mask.count_ones() as usize;
            (
                Just(mask),
                proptest::collection::vec(column(n), width),
                proptest::collection::vec(
                    prop_oneof![8 => Just(1u64), 1 => 1u64..10, 1 => 1u64..(1 << 40)],
                    n,
                ),
                0u64..(1 << 50),
                prop_oneof![Just(5_000i64), Just(1_000), 0i64..100_000],
                proptest::collection::vec(
                    prop_oneof![8 => 0i64..80, 1 => -3_000_000i64..3_000_000],
                    n,
                ),
            )
        })
        .prop_map(|(mask, columns, gaps, start_ms, period, jitter)| {
            let mut seq = 0u64;
            let samples = (0..gaps.len())
                .map(|i| {
                    seq += gaps[i];
                    let ms = start_ms as i64 + period * i as i64 + jitter[i];
                    Sample {
                        seq,
                        unix_ms: ms.clamp(0, (v2::MS_LIMIT - 1) as i64) as u64,
                        values: columns.iter().map(|c| c[i]).collect(),
                    }
                })
                .collect();
            (mask, samples)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn every_batch_round_trips_in_both_versions((mask, samples) in batch()) {
        for version in [CODEC_V1, CODEC_V2] {
            let bytes = codec::encode_as(version, mask, &samples).unwrap();
            prop_assert_eq!(bytes[0], version);
            let back = codec::decode(&bytes).unwrap();
            prop_assert_eq!(back.registers, mask);
            prop_assert_eq!(&back.samples, &samples);
        }
    }

    #[test]
    fn v2_is_never_much_worse_than_v1((mask, samples) in batch()) {
        let one = codec::encode_as(CODEC_V1, mask, &samples).unwrap().len();
        let two = codec::encode_as(CODEC_V2, mask, &samples).unwrap().len();
        // Per block, v2's worst case is an escape per value; bounded against v1's varints.
        prop_assert!(two <= one * 3 / 2 + 16, "v1 {} v2 {}", one, two);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_what_decodes_re_encodes(
        body in proptest::collection::vec(any::<u8>(), 0..400),
        mask in 1u16..=0x03FF,
        count in 1u64..300,
    ) {
        let mut bytes = vec![CODEC_V2, (mask >> 8) as u8, mask as u8];
        bytes.push(count as u8 & 0x7F);
        bytes.extend_from_slice(&body);
        if let Ok(batch) = codec::decode(&bytes) {
            let again = codec::encode_as(CODEC_V2, batch.registers, &batch.samples).unwrap();
            prop_assert_eq!(codec::decode(&again).unwrap(), batch);
        }
    }
}
