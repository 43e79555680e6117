//! Exports of a device's raw samples and rollups as a table, written as CSV
//! or Parquet (`arrow`/`parquet`): one column per field, time first.

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, TimestampMillisecondArray};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use ecowatt_proto::registers::REGISTERS;

use super::energy::RollupRow;
use super::read::{Reading, engineering};

/// A column of an export.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// Whole numbers (counts, sequence numbers, Unix ms).
    Int(Vec<i64>),
    /// Measurements, empty where there is none.
    Float(Vec<Option<f64>>),
}

/// An export: its rows' times (Unix ms, the first column) and named columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Each row's time, Unix ms.
    pub time_ms: Vec<i64>,
    /// The other columns, in order.
    pub columns: Vec<(String, Column)>,
}

/// A register's column name: `Pac_W`, `Temp_degC`.
fn column_name(address: usize, suffix: &str) -> String {
    let r = &REGISTERS[address];
    format!("{}{suffix}_{}", r.name, r.unit.replace('°', "deg").replace('%', "pct"))
}

/// Samples, one row each: `seq` and each wanted register in engineering units.
pub fn samples(readings: &[&Reading], wanted: &[usize]) -> Table {
    let mut columns =
        vec![("seq".to_owned(), Column::Int(readings.iter().map(|r| r.seq as i64).collect()))];
    for &a in wanted {
        let values =
            readings.iter().map(|r| r.values[a].map(|v| engineering(a, f64::from(v)))).collect();
        columns.push((column_name(a, ""), Column::Float(values)));
    }
    Table { time_ms: readings.iter().map(|r| r.unix_ms as i64).collect(), columns }
}

/// Rollup buckets, one row each: energy, coverage, counts and each wanted
/// register's mean, minimum and maximum in engineering units.
pub fn rollups(rows: &[RollupRow], wanted: &[usize]) -> Table {
    let int = |f: &dyn Fn(&RollupRow) -> i64| Column::Int(rows.iter().map(f).collect());
    let mut columns = vec![
        ("energy_wh".to_owned(), Column::Float(rows.iter().map(|r| Some(r.energy_wh)).collect())),
        ("covered_ms".to_owned(), int(&|r| r.covered_ms)),
        ("samples".to_owned(), int(&|r| r.samples)),
        ("missing".to_owned(), int(&|r| r.missing)),
    ];
    for &a in wanted {
        let stat = |f: &dyn Fn(&super::rollup::RegStat) -> f64| {
            Column::Float(
                rows.iter()
                    .map(|r| {
                        let s = &r.regs[a];
                        (s.n > 0).then(|| engineering(a, f(s)))
                    })
                    .collect(),
            )
        };
        columns.push((column_name(a, "_mean"), stat(&|s| s.sum as f64 / s.n as f64)));
        columns.push((column_name(a, "_min"), stat(&|s| s.min as f64)));
        columns.push((column_name(a, "_max"), stat(&|s| s.max as f64)));
    }
    Table { time_ms: rows.iter().map(|r| r.bucket_ms).collect(), columns }
}

/// RFC 3339 in UTC with milliseconds (`2026-12-01T10:00:05.000Z`).
fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| format!("{t:.3}"))
        .unwrap_or_else(|_| ms.to_string())
}

impl Table {
    /// Rows.
    pub fn len(&self) -> usize {
        self.time_ms.len()
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.time_ms.is_empty()
    }

    /// CSV with a header: `time` (RFC 3339, UTC), `unix_ms`, then the
    /// columns; an absent measurement is an empty field.
    pub fn csv(&self) -> String {
        let mut out = String::with_capacity(self.len() * (32 + 10 * self.columns.len()));
        out.push_str("time,unix_ms");
        for (name, _) in &self.columns {
            out.push(',');
            out.push_str(name);
        }
        out.push('\n');
        for (i, &t) in self.time_ms.iter().enumerate() {
            out.push_str(&rfc3339(t));
            out.push(',');
            out.push_str(&t.to_string());
            for (_, c) in &self.columns {
                out.push(',');
                match c {
                    Column::Int(v) => out.push_str(&v[i].to_string()),
                    Column::Float(v) => {
                        if let Some(x) = v[i] {
                            out.push_str(&x.to_string());
                        }
                    }
                }
            }
            out.push('\n');
        }
        out
    }

    /// Parquet (snappy): `time` as a UTC millisecond timestamp, then the
    /// columns (`Int64`, or nullable `Float64`).
    pub fn parquet(&self) -> Result<Vec<u8>, parquet::errors::ParquetError> {
        let mut fields = vec![Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        )];
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(
            TimestampMillisecondArray::from(self.time_ms.clone()).with_timezone("UTC"),
        )];
        for (name, c) in &self.columns {
            match c {
                Column::Int(v) => {
                    fields.push(Field::new(name, DataType::Int64, false));
                    arrays.push(Arc::new(Int64Array::from(v.clone())));
                }
                Column::Float(v) => {
                    fields.push(Field::new(name, DataType::Float64, true));
                    arrays.push(Arc::new(Float64Array::from(v.clone())));
                }
            }
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?;
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .set_created_by("ecowatt".into())
            .build();
        let mut out = Vec::new();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
        writer.write(&batch)?;
        writer.close()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(seq: u64, unix_ms: u64, vac: Option<u16>, pac: u16) -> Reading {
        let mut values = [None; ecowatt_proto::registers::REGISTER_COUNT];
        values[0] = vac;
        values[9] = Some(pac);
        Reading { seq, unix_ms, values }
    }

    #[test]
    fn samples_as_csv_in_units_with_empty_fields_for_absent_values() {
        let rs = [
            reading(7, 1_796_148_000_000, Some(2301), 1500),
            reading(8, 1_796_148_005_000, None, 1510),
        ];
        let refs: Vec<&Reading> = rs.iter().collect();
        let csv = samples(&refs, &[0, 9]).csv();
        assert_eq!(
            csv,
            "time,unix_ms,seq,Vac1_V,Pac_W\n\
             2026-12-01T18:00:00.000Z,1796148000000,7,230.1,1500\n\
             2026-12-01T18:00:05.000Z,1796148005000,8,,1510\n"
        );
    }

    #[test]
    fn parquet_reads_back_as_written() {
        use arrow_array::Array;
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let rs = [reading(1, 1_000, Some(2300), 10), reading(2, 6_000, None, 20)];
        let refs: Vec<&Reading> = rs.iter().collect();
        let bytes = samples(&refs, &[0, 9]).parquet().unwrap();
        assert_eq!(&bytes[..4], b"PAR1");
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        let b = &batches[0];
        let schema = b.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["time", "seq", "Vac1_V", "Pac_W"]);
        let time = b.column(0).as_any().downcast_ref::<TimestampMillisecondArray>().unwrap();
        assert_eq!(time.values(), &[1_000, 6_000]);
        let vac = b.column(2).as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!((vac.value(0), vac.is_null(1)), (230.0, true));
    }
}
