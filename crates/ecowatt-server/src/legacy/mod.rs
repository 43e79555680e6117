//! The original system's formats, for devices that migrate to EcoWatt
//! still running their original firmware (`--legacy-api`, docs/migration.md):
//! its command ids ([`ids`]), its upload security layer ([`envelope`]) and
//! compressed batches ([`packets`]), and the devices an operator marked as
//! running it, whose uploads this aggregate stores as ordinary telemetry.

pub mod crypto;
pub mod envelope;
pub mod hot;
pub mod ids;
pub mod ota;
pub mod packets;

use base64::Engine;
use ecowatt_proto::codec;
use serde_json::{Value, json};
use sqlx::Row;

use ecowatt_proto::messages::{OtaReport, OtaState, ota_reason};

use crate::db::{Db, StoreError, StoreResult, WriteTx};
use crate::devices::{Device, DeviceId, named_in};
use crate::firmware::rollouts::Offer;
use crate::firmware::rollouts::store::{offer_in, ota_report_in};
use crate::operators::audit;
use packets::{DecoderState, Undecodable};

/// Who the audit log names for what the original firmware's uploads do.
pub const ACTOR: &str = "legacy-api";

/// One compressed batch of an upload, as the original firmware sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The compressed bytes (Base64-decoded).
    pub bytes: Vec<u8>,
    /// Register ids of one sample.
    pub layout: Vec<u8>,
    /// The device's clock when the batch was made, ms since it started.
    pub millis: Option<u64>,
}

/// An upload's body, authenticated or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The device's name.
    pub device: String,
    /// The device's clock when it sent the upload, ms since it started.
    pub millis: Option<u64>,
    /// Its batches, oldest first.
    pub packets: Vec<Packet>,
}

/// Reads the original firmware's upload JSON (`{"device_id", "timestamp",
/// "compressed_data": [{"compressed_binary", "decompression_metadata":
/// {"register_layout", "timestamp", ...}}, ...]}`).
pub fn parse_upload(json: &[u8]) -> Result<Upload, crate::domain::Invalid> {
    use crate::domain::Invalid;
    let v: Value = serde_json::from_slice(json)
        .map_err(|e| Invalid::new("payload", format!("not JSON: {e}")))?;
    let device = v
        .get("device_id")
        .or_else(|| v.get("id"))
        .and_then(Value::as_str)
        .ok_or_else(|| Invalid::new("device_id", "required (a registered device's name)"))?
        .to_owned();
    let list = ["compressed_data", "smart_data", "binary_data", "data"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_array).filter(|a| !a.is_empty()))
        .ok_or_else(|| Invalid::new("compressed_data", "no compressed data found in payload"))?;
    let mut packets = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let field = format!("compressed_data[{i}]");
        let text = item
            .get("compressed_binary")
            .or_else(|| item.get("binary_data"))
            .and_then(Value::as_str)
            .ok_or_else(|| Invalid::new(&field, "compressed_binary (Base64) required"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| Invalid::new(&field, "compressed_binary is not Base64"))?;
        let meta = item.get("decompression_metadata").unwrap_or(&Value::Null);
        let layout = match meta.get("register_layout").and_then(Value::as_array) {
            Some(a) => a
                .iter()
                .map(|r| r.as_u64().and_then(|r| u8::try_from(r).ok()).filter(|&r| r <= 9))
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| {
                    Invalid::new(&field, "register_layout must list register ids 0..=9")
                })?,
            // The original's fixed order of all ten registers.
            None => (0..10).collect(),
        };
        packets.push(Packet {
            bytes,
            layout,
            millis: meta.get("timestamp").and_then(Value::as_u64),
        });
    }
    Ok(Upload { device, millis: v.get("timestamp").and_then(Value::as_u64), packets })
}

/// What an accepted upload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// Batches with samples stored.
    pub batches: usize,
    /// Samples stored.
    pub samples: usize,
    /// Samples not stored: a value of theirs was not known exactly.
    pub missing_samples: usize,
    /// Batches with samples not stored, with why (index in the upload, reason).
    pub undecodable: Vec<(usize, Undecodable)>,
    /// The newest export limit read (register 8), with its time.
    pub export_limit: Option<(u16, i64)>,
}

/// When the samples of an upload were read: the device has no wall clock,
/// so each batch's time is the server's receipt minus how long before the
/// upload the device made it, and a batch's samples are one poll interval
/// apart, its last at that time.
pub fn sample_times(
    now_ms: i64,
    upload_millis: Option<u64>,
    packet_millis: Option<u64>,
    samples: usize,
    poll_ms: i64,
) -> Vec<i64> {
    let age = match (upload_millis, packet_millis) {
        (Some(u), Some(p)) if p <= u => i64::try_from(u - p).unwrap_or(0),
        _ => 0,
    };
    let last = now_ms - age;
    (0..samples).map(|k| last - (samples - 1 - k) as i64 * poll_ms).collect()
}

/// A legacy device's download, for `/ota/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The device.
    pub device: String,
    /// The version offered.
    pub version: String,
    /// Its rollout state.
    pub state: String,
    /// Bytes served.
    pub done: i64,
    /// Image size.
    pub total: i64,
    /// Last change.
    pub updated_ms: i64,
}

/// The legacy devices.
#[derive(Clone)]
pub struct Legacy {
    db: Db,
    /// The image last prepared for chunked delivery (a download is
    /// hundreds of chunk requests for one image).
    encrypted: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<ota::Encrypted>>>>,
    /// The hot requests' answers kept in memory.
    hot: std::sync::Arc<hot::Hot>,
}

fn ota_report(state: OtaState, version: &str, done: i64, total: i64, reason: u8) -> OtaReport {
    OtaReport {
        state,
        version: version.to_owned(),
        done: done.max(0) as u64,
        total: total.max(0) as u64,
        reason,
    }
}

impl Legacy {
    /// Over `db`.
    pub fn new(db: Db) -> Self {
        Legacy {
            hot: std::sync::Arc::new(hot::Hot::new(db.clone())),
            db,
            encrypted: Default::default(),
        }
    }

    /// The hot requests' answers kept in memory.
    pub fn hot(&self) -> &hot::Hot {
        &self.hot
    }

    /// `image` (stored as `firmware_id`) encrypted for chunked delivery.
    pub fn encrypted(
        &self,
        firmware_id: i64,
        key: &[u8; 32],
        image: &[u8],
    ) -> std::sync::Arc<ota::Encrypted> {
        let mut cache = self.encrypted.lock().expect("legacy OTA cache");
        if let Some(e) = cache.as_ref().filter(|e| e.firmware_id == firmware_id) {
            return e.clone();
        }
        let e = std::sync::Arc::new(ota::encrypt(firmware_id, key, image));
        *cache = Some(e.clone());
        e
    }

    /// `/ota/check`: records the version the device runs (which completes
    /// its rollout when it is the one offered, and fails it when the device
    /// took every chunk and still runs the old one), then gives the update
    /// its rollout offers, if its wave has come. An offered image without a
    /// legacy signature fails the device's part: it could not check it.
    pub async fn ota_check(
        &self,
        name: &str,
        running: &str,
        now: i64,
    ) -> StoreResult<Option<Offer>> {
        let mut tx = self.db.write().await?;
        let device = named_in(&self.db, &mut tx, name, true).await?;
        sqlx::query("UPDATE devices SET firmware = $1, last_seen_ms = $2 WHERE id = $3")
            .bind(running)
            .bind(now)
            .bind(device.id)
            .execute(&mut *tx)
            .await?;
        let stuck = sqlx::query(
            "SELECT f.version, rd.done, rd.total FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
             JOIN firmware f ON f.id = r.firmware_id WHERE rd.device_id = $1 AND r.state = 'running' \
             AND rd.state = 'downloading' ORDER BY rd.rollout_id DESC LIMIT 1",
        )
        .bind(device.id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = stuck {
            let (version, done, total): (String, i64, i64) =
                (row.try_get("version")?, row.try_get("done")?, row.try_get("total")?);
            if total > 0 && done >= total && version != running {
                let report = ota_report(OtaState::RolledBack, &version, done, total, 0);
                ota_report_in(&self.db, &mut tx, device.id, &report, now).await?;
            }
        }
        let offer = offer_in(&self.db, &mut tx, device.id, now).await?;
        let Some(offer) = offer else {
            tx.commit().await?;
            return Ok(None);
        };
        if offer.manifest.get("legacy_signature").is_none() {
            let version = offer.manifest["version"].as_str().unwrap_or_default().to_owned();
            let size = offer.manifest["size"].as_i64().unwrap_or(0);
            let report =
                ota_report(OtaState::Failed, &version, 0, size, ota_reason::NO_TRUSTED_KEY);
            ota_report_in(&self.db, &mut tx, device.id, &report, now).await?;
            tx.commit().await?;
            tracing::warn!(device = name, %version, "a legacy device was offered an image without legacy_signature: \
                its part of the rollout failed (sign with `ecowatt firmware sign --legacy`)");
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(offer))
    }

    /// `/ota/chunk`: the image a device may download as `version` (its
    /// rollout offers it), with the download's progress recorded.
    pub async fn ota_chunk(
        &self,
        name: &str,
        version: &str,
        done: i64,
        now: i64,
    ) -> StoreResult<i64> {
        let mut tx = self.db.write().await?;
        let device = named_in(&self.db, &mut tx, name, true).await?;
        let row = sqlx::query(&format!(
            "SELECT r.firmware_id, f.size FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
             JOIN firmware f ON f.id = r.firmware_id WHERE rd.device_id = $1 AND r.state = 'running' \
             AND rd.wave <= r.current_wave AND f.version = $2 AND rd.state IN {} \
             ORDER BY rd.rollout_id DESC LIMIT 1",
            crate::firmware::rollouts::sql_list(&crate::firmware::rollouts::DeviceState::WAITING)
        ))
        .bind(device.id)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::Refused {
                code: "no_ota_session",
                message: format!("No active OTA session for {name:?} and version {version:?}"),
            });
        };
        let (firmware_id, size): (i64, i64) = (row.try_get("firmware_id")?, row.try_get("size")?);
        let report = ota_report(OtaState::Downloading, version, done.min(size), size, 0);
        ota_report_in(&self.db, &mut tx, device.id, &report, now).await?;
        tx.commit().await?;
        Ok(firmware_id)
    }

    /// `/ota/verify`: the device's verdict on the downloaded image.
    pub async fn ota_verified(
        &self,
        name: &str,
        version: &str,
        verified: bool,
        now: i64,
    ) -> StoreResult<()> {
        let mut tx = self.db.write().await?;
        let device = named_in(&self.db, &mut tx, name, true).await?;
        let (state, reason) = if verified {
            (OtaState::Verifying, 0)
        } else {
            (OtaState::Failed, ota_reason::BAD_SIGNATURE)
        };
        let report = ota_report(state, version, 0, 0, reason);
        ota_report_in(&self.db, &mut tx, device.id, &report, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The downloads of legacy devices in running rollouts.
    pub async fn sessions(&self) -> StoreResult<Vec<Session>> {
        let rows = sqlx::query(
            "SELECT d.name, f.version, rd.state, rd.done, rd.total, rd.updated_ms FROM rollout_devices rd \
             JOIN rollouts r ON r.id = rd.rollout_id JOIN firmware f ON f.id = r.firmware_id \
             JOIN devices d ON d.id = rd.device_id WHERE d.legacy = 1 AND r.state = 'running' ORDER BY d.name",
        )
        .fetch_all(self.db.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Session {
                    device: r.try_get("name")?,
                    version: r.try_get("version")?,
                    state: r.try_get("state")?,
                    done: r.try_get("done")?,
                    total: r.try_get("total")?,
                    updated_ms: r.try_get("updated_ms")?,
                })
            })
            .collect()
    }

    /// Marks a device as running the original firmware (its uploads are
    /// accepted under the original's weak security) or not.
    pub async fn mark(&self, name: &str, on: bool, actor: &str, now: i64) -> StoreResult<Device> {
        let mut tx = self.db.write().await?;
        let device = named_in(&self.db, &mut tx, name, true).await?;
        sqlx::query("UPDATE devices SET legacy = $1 WHERE id = $2")
            .bind(i64::from(on))
            .bind(device.id)
            .execute(&mut *tx)
            .await?;
        let action = if on { "device.legacy_on" } else { "device.legacy_off" };
        audit::record(&mut tx, now, actor, action, name, json!({})).await?;
        tx.announce(name).await?;
        tx.commit().await?;
        Ok(Device { legacy: on, ..device })
    }

    /// Stores an authenticated upload: refused whole unless the device is
    /// marked legacy and enabled and `nonce` exceeds every nonce accepted
    /// before; otherwise every batch that decodes is stored as telemetry
    /// and the nonce and encoder state advance, in one transaction.
    pub async fn store_upload(
        &self,
        upload: &Upload,
        nonce: u32,
        poll_ms: i64,
        now: i64,
    ) -> StoreResult<Stored> {
        let mut tx = self.db.write().await?;
        let device = named_in(&self.db, &mut tx, &upload.device, true).await?;
        let row =
            sqlx::query("SELECT legacy, legacy_nonce, legacy_state FROM devices WHERE id = $1")
                .bind(device.id)
                .fetch_one(&mut *tx)
                .await?;
        if row.try_get::<i64, _>("legacy")? == 0 {
            return Err(StoreError::Refused {
                code: "legacy_not_enabled",
                message: format!(
                    "device {:?} is not marked as running the original firmware; an operator \
                     allows its uploads with `ecowatt device legacy {} on`",
                    upload.device, upload.device
                ),
            });
        }
        if !device.enabled {
            return Err(StoreError::Refused {
                code: "device_disabled",
                message: format!("device {:?} is disabled", upload.device),
            });
        }
        let last: i64 = row.try_get("legacy_nonce")?;
        if i64::from(nonce) <= last {
            return Err(StoreError::Refused {
                code: "legacy_replay",
                message: format!(
                    "Replay attack detected! Nonce {nonce} <= last valid nonce {last}"
                ),
            });
        }
        let mut state: DecoderState = match row.try_get::<Option<String>, _>("legacy_state")? {
            Some(text) => serde_json::from_str(&text).unwrap_or_default(),
            None => DecoderState::default(),
        };
        let seq_row =
            sqlx::query("SELECT MAX(last_seq) AS seq FROM telemetry_batches WHERE device_id = $1")
                .bind(device.id)
                .fetch_one(&mut *tx)
                .await?;
        let mut seq = seq_row.try_get::<Option<i64>, _>("seq")?.unwrap_or(0) + 1;
        let first_seq = seq;
        let mut pending = Vec::new();
        let mut stored = Stored::default();
        let mut published = Vec::new();
        for (i, p) in upload.packets.iter().enumerate() {
            let batch = match packets::decode(&p.bytes, &p.layout, p.millis, &mut state) {
                Ok(b) => b,
                Err(e) => {
                    stored.undecodable.push((i, e));
                    continue;
                }
            };
            stored.missing_samples += batch.total - batch.samples.len();
            if let Some(why) = batch.missing.clone() {
                stored.undecodable.push((i, why));
            }
            if batch.samples.is_empty() {
                continue;
            }
            let times = sample_times(now, upload.millis, p.millis, batch.total, poll_ms);
            let samples: Vec<codec::Sample> = batch
                .samples
                .iter()
                .map(|(k, values)| {
                    let s = codec::Sample {
                        seq: seq as u64,
                        unix_ms: times[*k].max(0) as u64,
                        values: values.clone(),
                    };
                    seq += 1;
                    s
                })
                .collect();
            let limit = ecowatt_proto::registers::EXPORT_LIMIT;
            if batch.mask & (1 << limit) != 0 {
                let at = (batch.mask & ((1 << limit) - 1)).count_ones() as usize;
                if let Some(s) = samples.last() {
                    stored.export_limit = Some((s.values[at], s.unix_ms as i64));
                }
            }
            let data = codec::encode(batch.mask, &samples)
                .map_err(|e| StoreError::Corrupt(format!("legacy batch does not encode: {e}")))?;
            let b = crate::telemetry::StoredBatch::of(1, batch.mask, &samples, data);
            published.push(crate::news::Telemetry {
                device_id: device.id.0,
                data: b.data.as_slice().into(),
            });
            stored.batches += 1;
            stored.samples += samples.len();
            pending.push((b, codec::Batch { registers: batch.mask, samples }));
        }
        self.store_batches(&mut tx, device.id, first_seq, &pending, now).await?;
        let state_text = serde_json::to_string(&state).expect("state serialises");
        sqlx::query("UPDATE devices SET legacy_nonce = $1, legacy_state = $2, last_seen_ms = $3 WHERE id = $4")
            .bind(i64::from(nonce))
            .bind(state_text)
            .bind(now)
            .bind(device.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.db.news().telemetry(|| published);
        Ok(stored)
    }

    /// Writes a legacy upload's batches (`pending`, seqs from `first_seq`
    /// on, after every stored one) with their rollups, as the ingest does
    /// for device-protocol uploads: energy bridged from the device's newest
    /// stored sample, its new tail, each batch's first and last AC power.
    async fn store_batches(
        &self,
        tx: &mut WriteTx,
        device: DeviceId,
        first_seq: i64,
        pending: &[(crate::telemetry::StoredBatch, codec::Batch)],
        now: i64,
    ) -> StoreResult<()> {
        use crate::telemetry::rollup::{Stored as Item, Tail, literal_upsert, of_group};
        let row = sqlx::query("SELECT timezone, tail_ms, tail_pac FROM devices WHERE id = $1")
            .bind(device)
            .fetch_one(&mut **tx)
            .await?;
        let zone = jiff::tz::TimeZone::get(&row.try_get::<String, _>("timezone")?)
            .unwrap_or(jiff::tz::TimeZone::UTC);
        let tail = Tail {
            seq: first_seq - 1,
            ms: row.try_get("tail_ms")?,
            pac: row.try_get::<Option<i64>, _>("tail_pac")?.and_then(|p| u16::try_from(p).ok()),
        };
        let items: Vec<Item<'_>> = pending
            .iter()
            .map(|(_, decoded)| Item { device: device.0, original: decoded, new_seqs: None })
            .collect();
        let tails = std::iter::once((device.0, tail)).collect();
        let rollups = of_group(&items, |_| zone.clone(), tails, Default::default());
        for ((b, _), (first_pac, last_pac)) in pending.iter().zip(&rollups.edges) {
            sqlx::query(
                "INSERT INTO telemetry_batches (device_id, first_seq, last_seq, sample_count, first_ms, \
                 last_ms, registers, codec, data, received_ms, first_pac, last_pac) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(device)
            .bind(b.first_seq)
            .bind(b.last_seq)
            .bind(b.count)
            .bind(b.first_ms)
            .bind(b.last_ms)
            .bind(b.registers)
            .bind(b.codec)
            .bind(b.data.clone())
            .bind(now)
            .bind(first_pac.map(i64::from))
            .bind(last_pac.map(i64::from))
            .execute(&mut **tx)
            .await?;
        }
        for t in rollups.tails.values() {
            sqlx::query("UPDATE devices SET tail_ms = $1, tail_pac = $2 WHERE id = $3")
                .bind(t.ms)
                .bind(t.pac.map(i64::from))
                .bind(device)
                .execute(&mut **tx)
                .await?;
        }
        let mut sql = String::new();
        literal_upsert(&rollups.rollups, &mut sql, self.db.dialect());
        for statement in sql.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(statement).persistent(false).execute(&mut **tx).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_timed_back_from_the_upload() {
        // A batch made 3 s before the upload, of 5 samples 2 s apart.
        assert_eq!(
            sample_times(100_000, Some(50_000), Some(47_000), 5, 2_000),
            [89_000, 91_000, 93_000, 95_000, 97_000]
        );
        // No clocks (or a batch claiming to be newer than its upload): now.
        assert_eq!(sample_times(100_000, None, None, 2, 1_000), [99_000, 100_000]);
        assert_eq!(sample_times(100_000, Some(1), Some(5), 1, 1_000), [100_000]);
    }
}
