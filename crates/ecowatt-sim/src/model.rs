//! The physical model of one inverter: sun, clouds, PV strings, AC output
//! capped by the export limit, temperature, grid voltage and frequency.
//!
//! Everything random is a pure function of `(seed, time)` through a hash, so
//! the same seed gives the same day whatever the pattern of reads; the only
//! state is the export limit and the inverter's temperature, which follows its
//! power with a thermal lag integrated in fixed simulated-time steps.

use std::f64::consts::PI;

/// One inverter's static parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Seed of the weather and the noise.
    pub seed: u64,
    /// Rated AC power in watts (the export limit is a percentage of this).
    pub rated_w: u32,
    /// Offset of local solar time from UTC, in minutes (sunrise 06:00, sunset
    /// 18:00 local time).
    pub utc_offset_min: i32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { seed: 1, rated_w: 10_000, utc_offset_min: 0 }
    }
}

/// A reading of every quantity, in engineering units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// L1 phase voltage, V.
    pub vac1: f64,
    /// L1 phase current, A.
    pub iac1: f64,
    /// L1 frequency, Hz.
    pub fac1: f64,
    /// PV1 voltage, V.
    pub vpv1: f64,
    /// PV2 voltage, V.
    pub vpv2: f64,
    /// PV1 current, A.
    pub ipv1: f64,
    /// PV2 current, A.
    pub ipv2: f64,
    /// Internal temperature, °C.
    pub temp: f64,
    /// Export power limit, % of rated.
    pub limit_pct: u16,
    /// AC output power, W.
    pub pac: f64,
}

impl Reading {
    /// The ten holding registers, scaled by the register map's gains.
    pub fn to_registers(&self) -> [u16; 10] {
        let raw = |v: f64, gain: f64| (v * gain).round().clamp(0.0, 65_535.0) as u16;
        [
            raw(self.vac1, 10.0),
            raw(self.iac1, 10.0),
            raw(self.fac1, 100.0),
            raw(self.vpv1, 10.0),
            raw(self.vpv2, 10.0),
            raw(self.ipv1, 10.0),
            raw(self.ipv2, 10.0),
            raw(self.temp, 10.0),
            self.limit_pct,
            raw(self.pac, 1.0),
        ]
    }
}

/// Thermal time constant of the inverter, simulated seconds.
const THERMAL_TAU_S: f64 = 600.0;
/// Step of the thermal integration, simulated seconds.
const THERMAL_STEP_S: u64 = 10;
/// DC/AC conversion efficiency.
const EFFICIENCY: f64 = 0.97;
/// PV array size relative to the rated AC power (typical oversizing).
const DC_AC_RATIO: f64 = 1.15;

/// One inverter's physics and its mutable state.
#[derive(Debug, Clone)]
pub struct Model {
    config: ModelConfig,
    limit_pct: u16,
    /// Simulated second the temperature was last integrated to, and its value.
    thermal: Option<(u64, f64)>,
}

impl Model {
    /// A model with the export limit at 100 %.
    pub fn new(config: ModelConfig) -> Self {
        Model { config, limit_pct: 100, thermal: None }
    }

    /// The static parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The export limit, % of rated power.
    pub fn limit_pct(&self) -> u16 {
        self.limit_pct
    }

    /// Sets the export limit; the next reading reflects it.
    pub fn set_limit_pct(&mut self, pct: u16) {
        self.limit_pct = pct.min(100);
    }

    /// Everything the inverter measures at `unix_ms`.
    pub fn read(&mut self, unix_ms: u64) -> Reading {
        let t = unix_ms / 1000;
        let (pac, pdc, available) = self.power(t);
        let temp = self.temperature(t);
        let seed = self.config.seed;
        let rated = f64::from(self.config.rated_w);

        // Grid: slow wander plus fast noise; voltage rises a little with export.
        let slow = (t as f64 / 3_600.0 * 2.0 * PI).sin();
        let vac1 = 230.0 + 2.5 * slow + 2.0 * pac / rated + 0.4 * noise(seed, 1, t);
        let fac1 = 50.0 + 0.02 * slow + 0.015 * noise(seed, 2, t);
        let iac1 = if pac > 0.0 { pac / vac1 } else { 0.0 };

        // PV strings: open-circuit-ish voltage at night, MPP voltage by day,
        // pushed towards open circuit when the export limit curtails them.
        let irr = self.irradiance(t);
        let (vpv1, vpv2, ipv1, ipv2) = if irr <= 0.0 {
            (160.0 + 4.0 * noise(seed, 3, t), 160.0 + 4.0 * noise(seed, 4, t), 0.0, 0.0)
        } else {
            let ramp = (irr / 50.0).min(1.0);
            let curtailed = if available > 0.0 { 1.0 - pdc / available } else { 0.0 };
            let vmpp = 330.0 + 40.0 * (irr / 1000.0) + 35.0 * curtailed;
            let v1 = 160.0 + (vmpp - 160.0) * ramp + 1.5 * noise(seed, 3, t);
            let v2 = 160.0 + (0.98 * vmpp - 160.0) * ramp + 1.5 * noise(seed, 4, t);
            (v1, v2, 0.52 * pdc / v1, 0.48 * pdc / v2)
        };
        Reading { vac1, iac1, fac1, vpv1, vpv2, ipv1, ipv2, temp, limit_pct: self.limit_pct, pac }
    }

    /// Local solar time of day in hours, and the local day number.
    fn local(&self, t: u64) -> (f64, i64) {
        let local = t as i64 + i64::from(self.config.utc_offset_min) * 60;
        (local.rem_euclid(86_400) as f64 / 3_600.0, local.div_euclid(86_400))
    }

    /// Irradiance on the array, W/m², clouds included.
    pub fn irradiance(&self, t: u64) -> f64 {
        let (hour, day) = self.local(t);
        if !(6.0..18.0).contains(&hour) {
            return 0.0;
        }
        let clear = 1_000.0 * (PI * (hour - 6.0) / 12.0).sin().powf(1.3);
        clear * self.cloud_factor(t, day)
    }

    /// Fraction of clear-sky light getting through the clouds: each day has a
    /// cloudiness drawn from the seed; clouds pass as smooth noise with knots
    /// every 5 minutes, with a faint flicker every 30 seconds.
    fn cloud_factor(&self, t: u64, day: i64) -> f64 {
        let seed = self.config.seed;
        let cloudiness = 0.8 * unit(hash3(seed, 10, day as u64));
        let passing = smooth_noise(seed ^ (day as u64).wrapping_mul(0x9E37), 11, t, 300);
        let shade = ((passing - (1.0 - cloudiness)) / 0.2).clamp(0.0, 1.0);
        let flicker = 0.02 * (smooth_noise(seed, 12, t, 30) - 0.5);
        ((1.0 - 0.7 * shade) * (1.0 + flicker)).clamp(0.0, 1.0)
    }

    /// (AC power, DC power drawn, DC power available), watts, at second `t`.
    fn power(&self, t: u64) -> (f64, f64, f64) {
        let rated = f64::from(self.config.rated_w);
        let available = rated * DC_AC_RATIO * self.irradiance(t) / 1_000.0;
        let cap = rated * f64::from(self.limit_pct) / 100.0;
        let pac = (available * EFFICIENCY).min(rated).min(cap).max(0.0);
        (pac, pac / EFFICIENCY, available)
    }

    /// Ambient temperature, °C: coolest at 03:00, warmest at 15:00.
    fn ambient(&self, t: u64) -> f64 {
        let (hour, _) = self.local(t);
        18.0 + 7.0 * (PI * (hour - 9.0) / 12.0).sin()
    }

    /// Internal temperature, °C, lagging behind its steady state for the power.
    fn temperature(&mut self, t: u64) -> f64 {
        let rated = f64::from(self.config.rated_w);
        let steady = |m: &Self, s: u64| m.ambient(s) + 5.0 + 30.0 * m.power(s).0 / rated;
        let step = THERMAL_STEP_S;
        let target = t - t % step;
        let (mut at, mut temp) = match self.thermal {
            // Far behind (or first read): start from the steady state an hour earlier.
            Some((at, temp)) if at <= target && target - at <= 86_400 => (at, temp),
            Some((at, temp)) if at > target => return temp,
            _ => {
                let from = target.saturating_sub(3_600);
                (from, steady(self, from))
            }
        };
        let alpha = 1.0 - (-(step as f64) / THERMAL_TAU_S).exp();
        while at < target {
            at += step;
            temp += (steady(self, at) - temp) * alpha;
        }
        self.thermal = Some((at, temp));
        temp + 0.1 * noise(self.config.seed, 5, t)
    }
}

/// splitmix64 of a seed, a channel and an index.
fn hash3(seed: u64, channel: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(channel.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A hash as a number in `[0, 1)`.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// White noise in `[-1, 1)` for whole second `t`.
fn noise(seed: u64, channel: u64, t: u64) -> f64 {
    2.0 * unit(hash3(seed, channel, t)) - 1.0
}

/// Value noise in `[0, 1)`: random knots every `period` seconds, smoothly
/// interpolated between them.
fn smooth_noise(seed: u64, channel: u64, t: u64, period: u64) -> f64 {
    let k = t / period;
    let frac = (t % period) as f64 / period as f64;
    let s = frac * frac * (3.0 - 2.0 * frac);
    let a = unit(hash3(seed, channel, k));
    let b = unit(hash3(seed, channel, k + 1));
    a + (b - a) * s
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOON: u64 = 1_782_043_200_000; // 2026-06-21 12:00:00 UTC
    const MIDNIGHT: u64 = NOON - 12 * 3_600_000;

    fn model(seed: u64) -> Model {
        Model::new(ModelConfig { seed, ..ModelConfig::default() })
    }

    fn day(seed: u64) -> Vec<[u16; 10]> {
        let mut m = model(seed);
        (0..288).map(|i| m.read(MIDNIGHT + i * 300_000).to_registers()).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_day_and_another_seed_another() {
        assert_eq!(day(42), day(42));
        assert_ne!(day(42), day(43));
    }

    #[test]
    fn night_has_no_power_and_noon_has_plenty() {
        let mut m = model(7);
        let night = m.read(MIDNIGHT);
        assert_eq!((night.pac, night.ipv1, night.ipv2, night.iac1), (0.0, 0.0, 0.0, 0.0));
        assert!(night.vpv1 > 100.0, "strings float at night: {}", night.vpv1);
        let noon = m.read(NOON);
        assert!(noon.pac > 2_000.0, "noon power {}", noon.pac);
        assert!(noon.ipv1 > 1.0 && noon.vpv1 > 300.0);
        assert!((noon.fac1 - 50.0).abs() < 0.1 && (noon.vac1 - 230.0).abs() < 10.0);
    }

    #[test]
    fn the_export_limit_caps_ac_power_from_the_next_reading() {
        let mut m = model(3);
        let before = m.read(NOON);
        m.set_limit_pct(20);
        let after = m.read(NOON);
        assert!(after.pac <= 2_000.0, "{} W above 20 % of 10 kW", after.pac);
        assert!(before.pac > after.pac);
        assert!(after.ipv1 < before.ipv1, "PV current follows the curtailment");
    }

    #[test]
    fn temperature_follows_power_with_a_lag() {
        let mut m = model(5);
        let cool = m.read(MIDNIGHT).temp;
        let warm = m.read(NOON + 3_600_000).temp;
        assert!(warm > cool + 10.0, "{cool} -> {warm}");
        // Curtailing to 0 % cools the inverter, but not at once.
        m.set_limit_pct(0);
        let just_after = m.read(NOON + 3_660_000).temp;
        let later = m.read(NOON + 3 * 3_600_000).temp;
        assert!(just_after > later + 5.0, "{just_after} then {later}");
    }
}
