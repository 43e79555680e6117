//! The wire messages (`ecowatt_proto::messages`) to the aggregates' types
//! and back: a sync request as the report to apply, an upload as the batch
//! to store, a delivery as the answer's body.

use ecowatt_proto::codec;
use ecowatt_proto::firmware::PublicKey;
use ecowatt_proto::messages::{self, SyncRequest, SyncResponse, TelemetryUpload};
use ecowatt_proto::registers::EXPORT_LIMIT;
use serde_json::json;

use super::door::{Answer, Refused};
use super::{SyncDelivery, SyncReport, Upload};
use crate::commands::{Action, CommandOutcome};
use crate::config::{DeviceConfig, Rejection};
use crate::telemetry::StoredBatch;

/// A config as the protocol carries it.
pub fn config_state(version: i64, c: &DeviceConfig) -> messages::ConfigState {
    messages::ConfigState {
        version: version as u64,
        poll_interval_ms: c.poll_interval_ms as u32,
        upload_interval_ms: c.upload_interval_ms as u32,
        registers: c.registers.iter().fold(0u16, |m, r| m | (1 << r)),
    }
}

/// A config the device reports running.
pub fn device_config(c: &messages::ConfigState) -> DeviceConfig {
    DeviceConfig {
        poll_interval_ms: i64::from(c.poll_interval_ms),
        upload_interval_ms: i64::from(c.upload_interval_ms),
        registers: (0..10u16).filter(|r| c.registers & (1 << r) != 0).collect(),
    }
}

/// What a device's result says, in words (the protocol carries only the
/// outcome, the exception and the value read back).
pub fn result_message(r: &messages::CommandResult) -> Option<String> {
    match (r.succeeded, r.exception, r.value) {
        (_, Some(e), _) => Some(format!("Modbus exception {e:02X}")),
        (true, None, _) => None,
        (false, None, Some(v)) => Some(format!("the register reads {v}, not the value asked for")),
        (false, None, None) => Some(
            "no answer from the inverter (or the device restarted before it could read the register back)"
                .to_owned(),
        ),
    }
}

/// The report a sync request makes, sealed with `key_version` under `counter`.
pub fn report_of(request: &SyncRequest, key_version: i64, counter: u64) -> SyncReport {
    SyncReport {
        key_version,
        counter,
        applied: request.applied.as_ref().map(|c| (c.version as i64, device_config(c))),
        rejected: request
            .rejected
            .iter()
            .map(|r| Rejection::from_protocol(r.field, r.reason))
            .collect(),
        results: request
            .results
            .iter()
            .map(|r| {
                let outcome = CommandOutcome {
                    success: r.succeeded,
                    message: result_message(r),
                    exception_code: r.exception,
                    value: r.value,
                    executed_ms: (r.executed_ms > 0).then_some(r.executed_ms as i64),
                };
                (r.command_id as i64, outcome)
            })
            .collect(),
        firmware: (!request.firmware.is_empty()).then(|| request.firmware.clone()),
        ota: request.ota.clone(),
        control: request.control.clone(),
        schedule: request.schedule,
    }
}

/// The offer as the protocol carries it (an unreadable stored manifest
/// offers nothing, loudly).
fn offer(d: &SyncDelivery) -> Option<messages::UpdateOffer> {
    let stored = d.update.as_ref()?;
    let parsed = ecowatt_formats::manifest::parse_manifest(&stored.manifest).and_then(
        |(manifest, signer, sig)| {
            let token: [u8; 16] = ecowatt_proto::hex::decode(&stored.token)
                .ok()
                .and_then(|t| t.try_into().ok())
                .ok_or_else(|| ecowatt_formats::manifest::ManifestError("bad token".into()))?;
            let algorithm = match signer {
                PublicKey::Ed25519(_) => messages::signature_algorithm::ED25519,
                PublicKey::Rsa2048(_) => messages::signature_algorithm::RSA2048_SHA256,
            };
            Ok(messages::UpdateOffer { token, manifest, algorithm, signature: sig })
        },
    );
    match parsed {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::error!(device = %d.device, error = %e, "stored manifest unreadable; no offer");
            None
        }
    }
}

/// The versions in a codec bit set, `1, 2`.
pub fn codec_list(set: u8) -> String {
    (1..8).filter(|v| set & (1 << v) != 0).map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}

/// The body of a sync answer; `codecs`: the codecs offered, to a device that stated its own.
pub fn answer_body(d: &SyncDelivery, codecs: Option<u8>, now_ms: i64) -> Vec<u8> {
    SyncResponse {
        update: offer(d),
        server_time_ms: now_ms as u64,
        config: d.config.as_ref().map(|(v, c)| config_state(*v, c)),
        commands: d
            .commands
            .iter()
            .map(|c| messages::DeviceCommand {
                id: c.id as u64,
                op: match c.action {
                    Action::Write { register, value } => {
                        messages::Operation::Write { register, value }
                    }
                    Action::Read { register } => messages::Operation::Read { register },
                },
                expires_ms: c.expires_ms as u64,
            })
            .collect(),
        control: d.control.clone(),
        schedule: d.schedule.clone(),
        codecs,
        // Only a device that takes it gets an encrypted offer (`api/device.rs`).
        delivery: d
            .update
            .as_ref()
            .filter(|u| u.encrypted)
            .map(|_| ecowatt_proto::delivery::DEFAULT_CHUNK_LOG2),
    }
    .encode()
}

/// An upload's body decoded and checked (codec against those `offered`,
/// header against batch, `seq` range, sample times against the server's
/// clock `now_ms`), before anything is stored or acknowledged: a time outside
/// the range the server keeps would be acknowledged and then never shown.
pub fn upload_of(
    plaintext: &[u8],
    device: &str,
    offered: u8,
    now_ms: i64,
) -> Result<Upload, Refused> {
    let malformed = |reason: String| {
        Refused::new(
            Answer::MalformedBody,
            "malformed_body",
            Some(device),
            json!({"reason": reason}),
        )
    };
    let up = TelemetryUpload::decode(plaintext).map_err(|e| malformed(e.to_string()))?;
    if up.codec >= 8 || offered & (1 << up.codec) == 0 {
        let message = format!(
            "telemetry codec {} is not one this server offers ({}); upload with codec 1, or with what the sync answer offers",
            up.codec,
            codec_list(offered)
        );
        let detail = json!({"codec": up.codec, "offered": codec_list(offered)});
        return Err(Refused::new(
            Answer::CodecNotOffered(message),
            "codec_not_offered",
            Some(device),
            detail,
        ));
    }
    if up.batch.first() != Some(&up.codec) {
        return Err(malformed(format!("the batch is not encoded with codec {}", up.codec)));
    }
    let batch = codec::decode(&up.batch).map_err(|e| malformed(e.to_string()))?;
    let (Some(first), Some(last)) = (batch.samples.first(), batch.samples.last()) else {
        return Err(malformed("an empty batch".into()));
    };
    if first.seq != up.first_seq || batch.samples.len() != usize::from(up.count) {
        return Err(malformed("header disagrees with the batch".into()));
    }
    if last.seq > i64::MAX as u64 {
        return Err(malformed(format!("seq {} is beyond 2^63 - 1", last.seq)));
    }
    if let Some(bad) =
        batch.samples.iter().find(|x| !messages::sample_time_ok(x.unix_ms, now_ms as u64))
    {
        let message = format!(
            "sample {} is stamped {} ms; accepted are times from 2020-01-01 to one day past the server's clock ({now_ms} ms)",
            bad.seq, bad.unix_ms
        );
        let detail = json!({"seq": bad.seq, "unix_ms": bad.unix_ms, "server_ms": now_ms});
        return Err(Refused::new(
            Answer::SampleTimeOutOfRange(message),
            "sample_time_out_of_range",
            Some(device),
            detail,
        ));
    }
    let export_limit = (batch.registers & (1 << EXPORT_LIMIT) != 0).then(|| {
        let index = (batch.registers & ((1 << EXPORT_LIMIT) - 1)).count_ones() as usize;
        (last.values[index], last.unix_ms as i64)
    });
    Ok(Upload {
        batch: StoredBatch::of(up.codec, batch.registers, &batch.samples, up.batch.clone()),
        decoded: std::sync::Arc::new(batch),
        dropped_total: up.dropped_total.min(i64::MAX as u64) as i64,
        export_limit,
    })
}

#[cfg(test)]
mod tests {
    use ecowatt_proto::codec::{Sample, encode};

    use super::*;

    const NOW: i64 = 1_800_000_000_000;
    const ALL: u8 = codec::SUPPORTED;

    fn upload(mask: u16, samples: &[Sample]) -> Vec<u8> {
        TelemetryUpload {
            first_seq: samples[0].seq,
            count: samples.len() as u16,
            codec: codec::CODEC_V1,
            dropped_total: 3,
            batch: encode(mask, samples).unwrap(),
        }
        .encode()
    }

    fn sample(seq: u64, values: Vec<u16>) -> Sample {
        Sample { seq, unix_ms: NOW as u64 - 1000 + seq, values }
    }

    #[test]
    fn an_upload_becomes_its_batch_and_its_newest_export_limit_reading() {
        let mask = 1 | (1 << EXPORT_LIMIT);
        let body = upload(mask, &[sample(5, vec![1, 60]), sample(6, vec![2, 70])]);
        let u = upload_of(&body, "d", ALL, NOW).unwrap();
        assert_eq!((u.batch.first_seq, u.batch.last_seq, u.batch.count), (5, 6, 2));
        assert_eq!((u.dropped_total, u.export_limit), (3, Some((70, NOW - 994))));
        let without = upload(1, &[sample(5, vec![1])]);
        assert_eq!(upload_of(&without, "d", ALL, NOW).unwrap().export_limit, None);
    }

    #[test]
    fn bad_uploads_are_refused_with_their_reason() {
        let code = |body: &[u8]| upload_of(body, "d", ALL, NOW).unwrap_err().answer.code();
        assert_eq!(code(b"\x01\x02"), "malformed_body");
        let mut lying = TelemetryUpload::decode(&upload(1, &[sample(5, vec![1])])).unwrap();
        lying.count = 2;
        assert_eq!(code(&lying.encode()), "malformed_body");
        let mut other_codec = lying.clone();
        other_codec.count = 1;
        other_codec.codec = 9;
        assert_eq!(code(&other_codec.encode()), "codec_not_offered");
        // The header names one codec, the batch is another.
        other_codec.codec = codec::CODEC_V2;
        assert_eq!(code(&other_codec.encode()), "malformed_body");
        let future = Sample { seq: 1, unix_ms: NOW as u64 + 2 * 86_400_000, values: vec![1] };
        assert_eq!(code(&upload(1, &[future])), "sample_time_out_of_range");
        let old = Sample { seq: 1, unix_ms: 1_000, values: vec![1] };
        let refused = upload_of(&upload(1, &[old]), "d", ALL, NOW).unwrap_err();
        assert_eq!(
            (refused.kind, refused.detail["seq"].as_u64()),
            (Some("sample_time_out_of_range"), Some(1))
        );
    }

    #[test]
    fn a_v2_upload_is_taken_when_offered_and_refused_when_not() {
        let samples = [sample(5, vec![1, 60]), sample(6, vec![2, 70])];
        let mask = 1 | (1 << EXPORT_LIMIT);
        let body = TelemetryUpload {
            first_seq: 5,
            count: 2,
            codec: codec::CODEC_V2,
            dropped_total: 0,
            batch: codec::encode_as(codec::CODEC_V2, mask, &samples).unwrap(),
        }
        .encode();
        let u = upload_of(&body, "d", ALL, NOW).unwrap();
        assert_eq!((u.batch.codec, u.batch.count, u.export_limit), (2, 2, Some((70, NOW - 994))));
        let v1_only = 1 << codec::CODEC_V1;
        let refused = upload_of(&body, "d", v1_only, NOW).unwrap_err();
        assert_eq!(refused.answer.code(), "codec_not_offered");
        assert_eq!(refused.detail["offered"], "1");
        // v1 is taken whatever the offer.
        assert!(upload_of(&upload(mask, &samples), "d", v1_only, NOW).is_ok());
        assert_eq!(codec_list(ALL), "1, 2");
    }

    #[test]
    fn results_are_put_in_words() {
        let r = |succeeded, exception, value| messages::CommandResult {
            command_id: 1,
            succeeded,
            exception,
            value,
            executed_ms: 0,
        };
        assert_eq!(result_message(&r(true, None, Some(5))), None);
        assert_eq!(result_message(&r(false, Some(2), None)).unwrap(), "Modbus exception 02");
        assert!(result_message(&r(false, None, Some(7))).unwrap().contains("reads 7"));
        assert!(result_message(&r(false, None, None)).unwrap().contains("no answer"));
    }
}
