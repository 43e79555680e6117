//! A realistic inverter dataset, deterministic by seed: what real inverters
//! report and the simulator's smooth model does not. Clear-sky irradiance with
//! broken clouds (a Markov clear/cloudy process with soft cloud edges), grid
//! voltage and frequency that wander and jitter, MPPT hunting on two strings,
//! PV inputs that are not exactly zero at night, temperature with thermal lag,
//! export-limit steps, read-time jitter with retries and missed polls, and
//! faults (spikes, stuck values, 0xFFFF reads, bursts of garbage).

use ecowatt_proto::codec::Sample;

/// A deterministic generator (SplitMix64) with uniform and normal draws.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` and a stream number.
    pub fn new(seed: u64, stream: u64) -> Self {
        Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Normal with mean 0 and deviation `sigma`.
    pub fn normal(&mut self, sigma: f64) -> f64 {
        let (u, v) = (self.unit().max(1e-12), self.unit());
        sigma * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// What kind of day a trace is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sky {
    /// Clear sky with a little haze.
    Clear,
    /// Broken clouds: a Markov chain of clear and cloudy spells.
    Broken,
}

/// A trace to generate.
#[derive(Debug, Clone, Copy)]
pub struct Trace {
    /// Weather.
    pub sky: Sky,
    /// First hour of the day (local solar time) and how many hours.
    pub from_hour: f64,
    /// Hours.
    pub hours: f64,
    /// Add read faults (spikes, stuck values, 0xFFFF reads, bursts).
    pub faulty: bool,
}

/// 2026-06-21 00:00 UTC (local solar time = UTC).
const MIDNIGHT_MS: u64 = 1_782_000_000_000;
/// The poll schedule, ms.
pub const POLL_MS: u64 = 5_000;
const RATED_W: f64 = 10_000.0;

/// Generates a trace of 10-register samples (`seq` from 1, times on the poll
/// schedule plus the read's latency).
pub fn generate(trace: Trace, seed: u64) -> Vec<Sample> {
    let mut rng = Rng::new(seed, trace.sky as u64 * 7 + trace.faulty as u64);
    let polls = (trace.hours * 3600.0 * 1000.0 / POLL_MS as f64) as u64;
    let start_ms = MIDNIGHT_MS + (trace.from_hour * 3600.0 * 1000.0) as u64;
    let dt = POLL_MS as f64 / 1000.0;
    // Slow states.
    let (mut cloudy, mut cover, mut cloud_depth) = (false, 0.0f64, 0.35);
    let mut v_grid_drift = 0.0f64; // V
    let mut f_dev = 0.0f64; // Hz
    let mut temp = 24.0f64; // °C, the inverter's
    let mut hunt = 0.0f64; // MPPT perturbation, V
    let mut hunt_dir = 1.0f64;
    let mut stuck: Option<(usize, u16, u64)> = None; // register, value, polls left
    let mut burst = 0u64;
    let mut out = Vec::with_capacity(polls as usize);
    let mut seq = 0u64;
    for k in 0..polls {
        let t = start_ms + k * POLL_MS;
        let hour = ((t - MIDNIGHT_MS) as f64 / 3_600_000.0) % 24.0;
        // Sun: up 05:00–21:00, peak 1000 W/m² at noon, air-mass shaped.
        let sun = if (5.0..21.0).contains(&hour) {
            (std::f64::consts::PI * (hour - 5.0) / 16.0).sin().max(0.0)
        } else {
            0.0
        };
        let clear = 1000.0 * sun.powf(1.25) * (1.0 + rng.normal(0.004));
        if trace.sky == Sky::Broken {
            let flip = if cloudy { 0.03 } else { 0.015 };
            if rng.chance(flip) {
                cloudy = !cloudy;
                if cloudy {
                    cloud_depth = 0.2 + 0.4 * rng.unit();
                }
            }
        }
        let target = if cloudy { cloud_depth } else { 1.0 };
        cover += (target - cover) * (1.0 - (-dt / 12.0).exp()); // soft cloud edges
        if k == 0 {
            cover = target;
        }
        let irradiance = (clear * if trace.sky == Sky::Broken { cover } else { 1.0 }).max(0.0);
        // Export-limit steps: curtailed 11:00–14:00, and an aggregator's dip.
        let limit: u16 = match hour {
            h if (11.0..14.0).contains(&h) => 60,
            h if (16.5..16.75).contains(&h) => 30,
            _ => 100,
        };
        let available = irradiance / 1000.0 * RATED_W * 0.96;
        let pac = available.min(f64::from(limit) / 100.0 * RATED_W);
        let pac = if irradiance > 8.0 { (pac + rng.normal(6.0)).max(0.0) } else { 0.0 };
        // Grid: slow drift (bounded random walk), noise, a rise with export.
        v_grid_drift = (v_grid_drift + rng.normal(0.05)) * 0.9995;
        let vac = 230.5 + v_grid_drift + pac / RATED_W * 1.8 + rng.normal(0.25);
        f_dev = f_dev * (-dt / 40.0f64).exp() + rng.normal(0.004);
        let fac = 50.0 + f_dev + rng.normal(0.003);
        let iac = if pac > 0.0 { pac / vac + rng.normal(0.04) } else { rng.normal(0.02).abs() };
        // PV strings: MPPT hunting around Vmp (falls with heat); residual at night.
        let (vpv1, vpv2, ipv1, ipv2);
        if irradiance > 8.0 {
            hunt += hunt_dir * 1.2;
            if hunt.abs() > 2.4 || rng.chance(0.2) {
                hunt_dir = -hunt_dir;
            }
            let vmp = 372.0 + 9.0 * (irradiance / 1000.0).ln().max(-3.0) - 0.9 * (temp - 25.0);
            vpv1 = vmp + hunt + rng.normal(0.3);
            vpv2 = vmp * 0.985 + hunt * 0.9 + rng.normal(0.3);
            let p_dc = pac / 0.96;
            ipv1 = p_dc * 0.52 / vpv1 + rng.normal(0.03);
            ipv2 = p_dc * 0.48 / vpv2 + rng.normal(0.03);
        } else {
            // Open-circuit residue and sensor offsets: a few volts, flickering tenths of amps.
            let glow = 1.5 + 12.0 * irradiance / 8.0;
            vpv1 = glow + rng.normal(0.2);
            vpv2 = glow * 0.8 + rng.normal(0.2);
            ipv1 = if rng.chance(0.03) { 0.1 } else { 0.0 };
            ipv2 = 0.0;
        }
        // Temperature: ambient + losses, with a thermal lag of 15 min.
        let ambient = 17.0 + 9.0 * (std::f64::consts::PI * (hour - 9.0) / 12.0).sin();
        let steady = ambient + 22.0 * pac / RATED_W;
        temp += (steady - temp) * (1.0 - (-dt / 900.0).exp());
        let temp_read = temp + rng.normal(0.04);

        let reg = |v: f64, gain: f64| (v * gain).round().clamp(0.0, 65_535.0) as u16;
        let mut values = vec![
            reg(vac, 10.0),
            reg(iac, 10.0),
            reg(fac, 100.0),
            reg(vpv1, 10.0),
            reg(vpv2, 10.0),
            reg(ipv1, 10.0),
            reg(ipv2, 10.0),
            reg(temp_read, 10.0),
            limit,
            reg(pac, 1.0),
        ];
        // Read timing: latency 20–60 ms, a retry after a 1 s timeout now and
        // then, and a poll missed altogether (nothing stored) more rarely.
        if rng.chance(0.002) {
            continue;
        }
        let mut latency = 20 + (rng.unit() * 40.0) as u64;
        if rng.chance(0.01) {
            latency += 1_000;
        }
        if trace.faulty {
            if rng.chance(0.003) {
                values = vec![0xFFFF; 10]; // a failed read reported as all ones
            } else if rng.chance(0.005) {
                let r = (rng.unit() * 10.0) as usize;
                values[r] = (rng.unit() * 65_536.0) as u16; // a spike
            }
            if stuck.is_none() && rng.chance(0.0005) {
                let r = 3 + (rng.unit() * 4.0) as usize;
                stuck = Some((r, values[r], 60 + (rng.unit() * 120.0) as u64));
            }
            if let Some((r, v, left)) = stuck.as_mut() {
                values[*r] = *v;
                *left -= 1;
                if *left == 0 {
                    stuck = None;
                }
            }
            if burst == 0 && rng.chance(0.0003) {
                burst = 12 + (rng.unit() * 24.0) as u64;
            }
            if burst > 0 {
                burst -= 1;
                for v in values.iter_mut() {
                    if rng.chance(0.5) {
                        *v = (rng.unit() * 65_536.0) as u16;
                    }
                }
            }
        }
        seq += 1;
        out.push(Sample { seq, unix_ms: t + latency, values });
    }
    out
}

/// The traces of `ecowatt bench codec`, named.
pub fn traces() -> [(&'static str, Trace); 5] {
    let day = |sky| Trace { sky, from_hour: 0.0, hours: 24.0, faulty: false };
    [
        ("clear day (24 h)", day(Sky::Clear)),
        ("broken clouds day (24 h)", day(Sky::Broken)),
        ("daylight, broken (05-21 h)", Trace { from_hour: 5.0, hours: 16.0, ..day(Sky::Broken) }),
        ("night (21-05 h)", Trace { from_hour: 21.0, hours: 8.0, ..day(Sky::Clear) }),
        ("faulty, broken (24 h)", Trace { faulty: true, ..day(Sky::Broken) }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dataset_is_deterministic_and_has_what_real_data_has() {
        let t = traces()[1].1;
        let a = generate(t, 3);
        assert_eq!(a, generate(t, 3));
        assert_ne!(a, generate(t, 4));
        // Missed polls, jitter, night PV residue, export steps, grid noise.
        assert!(a.len() < 17_280 && a.len() > 17_000, "{}", a.len());
        assert!(a.windows(2).any(|w| w[1].unix_ms - w[0].unix_ms > 9_000));
        assert!(a.iter().any(|s| s.unix_ms % 5_000 != 0));
        let night = &a[..100];
        assert!(night.iter().all(|s| s.values[9] == 0 && s.values[3] > 0));
        assert!(a.iter().any(|s| s.values[8] == 60) && a.iter().any(|s| s.values[8] == 30));
        let freqs: std::collections::BTreeSet<u16> = a.iter().map(|s| s.values[2]).collect();
        assert!(freqs.len() > 5, "frequency wanders: {freqs:?}");
        let faulty = generate(traces()[4].1, 3);
        assert!(faulty.iter().any(|s| s.values == vec![0xFFFF; 10]));
    }
}
