//! Pricing models: pure functions from a quantity to an exact, unrounded amount.
//!
//! Tier bounds are inclusive upper bounds: a tier with `up_to = 1000` after one with
//! `up_to = 100` covers quantities in (100, 1000]. Zero billable units cost nothing in every
//! model, tier flat fees included (a fixed fee is a `flat` charge). Results are exact: an
//! amount `Decimal` cannot hold exactly is `Error::Overflow`, never a rounded figure.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::exact;

/// How a usage charge turns a billable quantity into an amount.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Model {
    /// Every unit at `price`.
    PerUnit { price: Decimal },
    /// `price` per block of `size` units; a partial block counts as a whole one.
    Package { size: Decimal, price: Decimal },
    /// Each unit at the price of the tier it falls in, plus the flat fee of every tier
    /// reached.
    Graduated { tiers: Vec<Tier> },
    /// Every unit at the price of the tier the total falls in, plus that tier's flat fee.
    Volume { tiers: Vec<Tier> },
}

/// One tier of a graduated or volume model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Inclusive upper bound; `None` for the last, open-ended tier.
    pub up_to: Option<Decimal>,
    pub unit_price: Decimal,
    /// Charged once when the tier is reached (graduated) or is the one the total falls in
    /// (volume).
    pub flat_fee: Decimal,
}

/// What one tier contributed to an amount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierAmount {
    /// Position in the model's `tiers`, from 0, as in the plan file's error paths.
    pub tier: usize,
    /// Exclusive lower bound of the tier.
    pub from: Decimal,
    /// Inclusive upper bound; absent for the open-ended tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Decimal>,
    /// Units priced in this tier (volume: all of them).
    pub units: Decimal,
    pub unit_price: Decimal,
    pub flat_fee: Decimal,
    /// `units × unit_price + flat_fee`, exact.
    pub amount: Decimal,
}

/// The exact amount of a quantity under a model, with what explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    /// Exact and unrounded; the invoice rounds it once, per line.
    pub amount: Decimal,
    /// The price every unit was charged at: per-unit models, and volume (the tier reached).
    pub unit_price: Option<Decimal>,
    /// Blocks charged by a package model.
    pub packages: Option<Decimal>,
    /// Per-tier contributions of a graduated or volume model; tiers with no units are left
    /// out. Their units sum to the quantity and their amounts to `amount`.
    pub tiers: Vec<TierAmount>,
}

impl Model {
    /// Checks the rules the plan loader enforces, naming the offending field relative to the
    /// charge (`tiers[2].up_to`): prices and fees ≥ 0, package size > 0, tier bounds > 0 and
    /// strictly increasing, exactly one open-ended tier and it is the last.
    pub fn check(&self) -> Result<()> {
        let invalid = |field: String, reason: String| Err(Error::InvalidModel { field, reason });
        // The field is named only on failure: this runs on every `price` call.
        let non_negative = |field: &dyn Fn() -> String, d: Decimal| {
            if d.is_sign_negative() && !d.is_zero() {
                invalid(field(), format!("must not be negative (got {d})"))
            } else {
                Ok(())
            }
        };
        match self {
            Model::PerUnit { price } => non_negative(&|| "price".into(), *price),
            Model::Package { size, price } => {
                if *size <= Decimal::ZERO {
                    return invalid("size".into(), format!("must be positive (got {size})"));
                }
                non_negative(&|| "price".into(), *price)
            }
            Model::Graduated { tiers } | Model::Volume { tiers } => {
                if tiers.is_empty() {
                    return invalid("tiers".into(), "needs at least one tier".into());
                }
                let mut prev = Decimal::ZERO;
                for (i, t) in tiers.iter().enumerate() {
                    non_negative(&|| format!("tiers[{i}].unit_price"), t.unit_price)?;
                    non_negative(&|| format!("tiers[{i}].flat_fee"), t.flat_fee)?;
                    let last = i + 1 == tiers.len();
                    match (t.up_to, last) {
                        (None, true) => {}
                        (None, false) => {
                            return invalid(
                                format!("tiers[{i}].up_to"),
                                "only the last tier may be open-ended".into(),
                            )
                        }
                        (Some(u), true) => {
                            return invalid(
                                format!("tiers[{i}].up_to"),
                                format!("the last tier must be open-ended (got {u}); remove up_to"),
                            )
                        }
                        (Some(u), false) if u <= prev => {
                            let reason = if i == 0 {
                                format!("tier bounds must be positive (got {u})")
                            } else {
                                format!("tier bounds must increase (got {u} after {prev})")
                            };
                            return invalid(format!("tiers[{i}].up_to"), reason);
                        }
                        (Some(u), false) => prev = u,
                    }
                }
                Ok(())
            }
        }
    }
}

/// The exact amount of `quantity` units under `model`.
pub fn price(model: &Model, quantity: Decimal) -> Result<Priced> {
    if quantity.is_sign_negative() && !quantity.is_zero() {
        return Err(Error::NegativeQuantity { quantity });
    }
    model.check()?;
    let mut priced = Priced {
        amount: Decimal::ZERO,
        unit_price: None,
        packages: None,
        tiers: Vec::new(),
    };
    match model {
        Model::PerUnit { price } => {
            priced.amount = exact::mul(quantity, *price, "per-unit amount")?;
            priced.unit_price = Some(*price);
        }
        Model::Package { size, price } => {
            let blocks = packages(quantity, *size)?;
            priced.amount = exact::mul(blocks, *price, "package amount")?;
            priced.packages = Some(blocks);
        }
        Model::Graduated { tiers } => {
            priced.tiers = graduated(tiers, quantity)?;
            priced.amount = sum(priced.tiers.iter().map(|t| t.amount), "graduated amount")?;
        }
        Model::Volume { tiers } => {
            if let Some(t) = volume(tiers, quantity)? {
                priced.amount = t.amount;
                priced.unit_price = Some(t.unit_price);
                priced.tiers.push(t);
            }
        }
    }
    Ok(priced)
}

/// ⌈quantity ÷ size⌉, computed with an exact remainder so no division is rounded.
fn packages(quantity: Decimal, size: Decimal) -> Result<Decimal> {
    let overflow = Error::Overflow {
        what: "package count",
    };
    let rem = quantity.checked_rem(size).ok_or(Error::Overflow {
        what: "package count",
    })?;
    let whole = exact::sub(quantity, rem, "package count")?
        .checked_div(size)
        .ok_or(overflow)?
        .trunc();
    if rem.is_zero() {
        Ok(whole.normalize())
    } else {
        exact::add(whole, Decimal::ONE, "package count").map(|d| d.normalize())
    }
}

fn graduated(tiers: &[Tier], quantity: Decimal) -> Result<Vec<TierAmount>> {
    let mut out = Vec::new();
    let mut from = Decimal::ZERO;
    for (i, t) in tiers.iter().enumerate() {
        if quantity <= from {
            break;
        }
        let top = match t.up_to {
            Some(u) if u < quantity => u,
            _ => quantity,
        };
        let units = exact::sub(top, from, "tier units")?.normalize();
        let amount = exact::add(
            exact::mul(units, t.unit_price, "tier amount")?,
            t.flat_fee,
            "tier amount",
        )?;
        out.push(TierAmount {
            tier: i,
            from,
            to: t.up_to,
            units,
            unit_price: t.unit_price,
            flat_fee: t.flat_fee,
            amount: amount.normalize(),
        });
        match t.up_to {
            Some(u) => from = u,
            None => break,
        }
    }
    Ok(out)
}

fn volume(tiers: &[Tier], quantity: Decimal) -> Result<Option<TierAmount>> {
    if quantity.is_zero() {
        return Ok(None);
    }
    let mut from = Decimal::ZERO;
    for (i, t) in tiers.iter().enumerate() {
        if t.up_to.is_none_or(|u| quantity <= u) {
            let amount = exact::add(
                exact::mul(quantity, t.unit_price, "volume amount")?,
                t.flat_fee,
                "volume amount",
            )?;
            return Ok(Some(TierAmount {
                tier: i,
                from,
                to: t.up_to,
                units: quantity.normalize(),
                unit_price: t.unit_price,
                flat_fee: t.flat_fee,
                amount: amount.normalize(),
            }));
        }
        from = t.up_to.unwrap_or(from);
    }
    // `check` guarantees an open-ended last tier.
    Ok(None)
}

fn sum(mut amounts: impl Iterator<Item = Decimal>, what: &'static str) -> Result<Decimal> {
    amounts.try_fold(Decimal::ZERO, |acc, a| exact::add(acc, a, what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).expect("decimal literal")
    }

    fn tier(up_to: Option<&str>, unit_price: &str, flat_fee: &str) -> Tier {
        Tier {
            up_to: up_to.map(d),
            unit_price: d(unit_price),
            flat_fee: d(flat_fee),
        }
    }

    fn three_tiers() -> Vec<Tier> {
        vec![
            tier(Some("1000"), "0.10", "0"),
            tier(Some("10000"), "0.05", "5"),
            tier(None, "0.01", "0"),
        ]
    }

    fn amount(model: &Model, q: &str) -> Decimal {
        price(model, d(q)).expect("priced").amount
    }

    #[test]
    fn per_unit_is_quantity_times_price() {
        let m = Model::PerUnit { price: d("0.0015") };
        assert_eq!(amount(&m, "1234567"), d("1851.8505"));
        assert_eq!(amount(&m, "0"), d("0"));
        let p = price(&m, d("2")).expect("priced");
        assert_eq!(p.unit_price, Some(d("0.0015")));
        assert!(p.tiers.is_empty());
    }

    #[test]
    fn package_rounds_partial_blocks_up() {
        let m = Model::Package {
            size: d("1000"),
            price: d("2.50"),
        };
        assert_eq!(amount(&m, "0"), d("0"));
        assert_eq!(amount(&m, "1"), d("2.50"));
        assert_eq!(amount(&m, "1000"), d("2.50"));
        assert_eq!(amount(&m, "1000.000000001"), d("5.00"));
        assert_eq!(amount(&m, "2500"), d("7.50"));
        assert_eq!(price(&m, d("2500")).expect("p").packages, Some(d("3")));
        let m = Model::Package {
            size: d("0.5"),
            price: d("1"),
        };
        assert_eq!(amount(&m, "1.2"), d("3"));
    }

    #[test]
    fn graduated_prices_each_unit_in_its_tier() {
        let m = Model::Graduated {
            tiers: three_tiers(),
        };
        assert_eq!(amount(&m, "0"), d("0"));
        assert_eq!(amount(&m, "500"), d("50"));
        assert_eq!(amount(&m, "1000"), d("100"));
        // 1000 × 0.10 + (5 + 1 × 0.05): the second tier's fee once it is reached.
        assert_eq!(amount(&m, "1001"), d("105.05"));
        // 100 + (5 + 9000 × 0.05) + 5000 × 0.01
        let p = price(&m, d("15000")).expect("priced");
        assert_eq!(p.amount, d("605"));
        let units: Vec<_> = p.tiers.iter().map(|t| (t.tier, t.units)).collect();
        assert_eq!(units, [(0, d("1000")), (1, d("9000")), (2, d("5000"))]);
        assert_eq!(p.tiers[2].from, d("10000"));
        assert_eq!(p.tiers[2].to, None);
        assert_eq!(p.unit_price, None);
    }

    #[test]
    fn fractional_quantities_across_a_bound() {
        let g = Model::Graduated {
            tiers: three_tiers(),
        };
        // 1000 × 0.10 + (5 + 0.5 × 0.05)
        assert_eq!(amount(&g, "1000.5"), d("105.025"));
        assert_eq!(amount(&g, "999.999999999"), d("99.9999999999"));
        let v = Model::Volume {
            tiers: three_tiers(),
        };
        // the bound is inclusive: 1000 is in the first tier, anything above in the second
        assert_eq!(amount(&v, "1000.000000001"), d("55.00000000005"));
        assert_eq!(amount(&v, "0.5"), d("0.05"));
    }

    #[test]
    fn huge_quantities_price_exactly() {
        // 10^18 units: 100 + (5 + 9000 × 0.05) + (10^18 − 10000) × 0.01
        let g = Model::Graduated {
            tiers: three_tiers(),
        };
        assert_eq!(amount(&g, "1000000000000000000"), d("10000000000000455.00"));
        let v = Model::Volume {
            tiers: three_tiers(),
        };
        assert_eq!(
            amount(&v, "1000000000000000000.5"),
            d("10000000000000000.005")
        );
        let per_unit = Model::PerUnit {
            price: d("0.000000001"),
        };
        assert_eq!(
            amount(&per_unit, "79228162514264337593"),
            d("79228162514.264337593")
        );
    }

    #[test]
    fn volume_prices_all_units_at_the_tier_reached() {
        let m = Model::Volume {
            tiers: three_tiers(),
        };
        assert_eq!(amount(&m, "0"), d("0"));
        assert_eq!(amount(&m, "1000"), d("100"));
        assert_eq!(amount(&m, "1001"), d("55.05"));
        assert_eq!(amount(&m, "10000"), d("505"));
        let p = price(&m, d("15000")).expect("priced");
        assert_eq!(p.amount, d("150"));
        assert_eq!(p.unit_price, Some(d("0.01")));
        assert_eq!(p.tiers.len(), 1);
        assert_eq!((p.tiers[0].tier, p.tiers[0].from), (2, d("10000")));
    }

    #[test]
    fn negative_quantities_are_refused() {
        let m = Model::PerUnit { price: d("1") };
        let e = price(&m, d("-0.5")).expect_err("negative");
        assert_eq!(e.to_string(), "quantity -0.5: must not be negative");
        assert!(price(&m, d("-0")).is_ok());
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let m = Model::PerUnit {
            price: Decimal::MAX,
        };
        assert!(matches!(price(&m, d("2")), Err(Error::Overflow { .. })));
        let m = Model::Graduated {
            tiers: vec![
                tier(Some("1"), "0", &Decimal::MAX.to_string()),
                tier(None, "0", "1"),
            ],
        };
        assert!(matches!(price(&m, d("2")), Err(Error::Overflow { .. })));
    }

    #[test]
    fn invalid_models_are_refused_with_the_field() {
        let check = |m: Model| m.check().expect_err("invalid").to_string();
        assert_eq!(
            check(Model::Graduated {
                tiers: vec![
                    tier(Some("1000"), "1", "0"),
                    tier(Some("100"), "1", "0"),
                    tier(None, "1", "0")
                ]
            }),
            "tiers[1].up_to: tier bounds must increase (got 100 after 1000)"
        );
        assert_eq!(
            check(Model::Volume {
                tiers: vec![tier(None, "1", "0"), tier(None, "1", "0")]
            }),
            "tiers[0].up_to: only the last tier may be open-ended"
        );
        assert_eq!(
            check(Model::Volume {
                tiers: vec![tier(Some("5"), "1", "0")]
            }),
            "tiers[0].up_to: the last tier must be open-ended (got 5); remove up_to"
        );
        assert_eq!(
            check(Model::Graduated { tiers: vec![] }),
            "tiers: needs at least one tier"
        );
        assert_eq!(
            check(Model::Graduated {
                tiers: vec![tier(Some("0"), "1", "0"), tier(None, "1", "0")]
            }),
            "tiers[0].up_to: tier bounds must be positive (got 0)"
        );
        assert_eq!(
            check(Model::Graduated {
                tiers: vec![tier(None, "1", "-1")]
            }),
            "tiers[0].flat_fee: must not be negative (got -1)"
        );
        assert_eq!(
            check(Model::Package {
                size: d("0"),
                price: d("1")
            }),
            "size: must be positive (got 0)"
        );
        assert_eq!(
            check(Model::PerUnit { price: d("-0.01") }),
            "price: must not be negative (got -0.01)"
        );
    }

    /// Quantities with up to 6 decimals, below ten million.
    fn quantity() -> impl Strategy<Value = Decimal> {
        (0i64..10_000_000_000_000).prop_map(|n| Decimal::new(n, 6))
    }

    fn money() -> impl Strategy<Value = Decimal> {
        (0i64..1_000_000).prop_map(|n| Decimal::new(n, 4))
    }

    /// Valid tiers: increasing bounds, open last tier, random prices and fees.
    fn tiers() -> impl Strategy<Value = Vec<Tier>> {
        proptest::collection::vec((1i64..5_000_000, money(), money()), 1..6).prop_map(|raw| {
            let mut bound = Decimal::ZERO;
            let n = raw.len();
            raw.into_iter()
                .enumerate()
                .map(|(i, (step, unit_price, flat_fee))| {
                    bound += Decimal::new(step, 2);
                    Tier {
                        up_to: (i + 1 < n).then_some(bound),
                        unit_price,
                        flat_fee,
                    }
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn graduated_is_monotone(tiers in tiers(), a in quantity(), b in quantity()) {
            let m = Model::Graduated { tiers };
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(price(&m, lo).expect("lo").amount <= price(&m, hi).expect("hi").amount);
        }

        #[test]
        fn breakdowns_add_up(tiers in tiers(), q in quantity(), graduated in any::<bool>()) {
            let m = if graduated { Model::Graduated { tiers } } else { Model::Volume { tiers } };
            let p = price(&m, q).expect("priced");
            let units: Decimal = p.tiers.iter().map(|t| t.units).sum();
            let amounts: Decimal = p.tiers.iter().map(|t| t.amount).sum();
            prop_assert_eq!(units, q);
            prop_assert_eq!(amounts, p.amount);
            for t in &p.tiers {
                prop_assert_eq!(t.amount, t.units * t.unit_price + t.flat_fee);
                prop_assert!(t.units > Decimal::ZERO);
                prop_assert!(t.to.is_none_or(|to| t.from < to && (graduated || q <= to)));
            }
        }

        /// Volume pricing is the declared piecewise function: the first tier whose bound
        /// holds the quantity prices every unit, plus its fee; nothing for no units.
        #[test]
        fn volume_is_piecewise_as_declared(tiers in tiers(), q in quantity()) {
            let expected = if q.is_zero() {
                Decimal::ZERO
            } else {
                let t = tiers
                    .iter()
                    .find(|t| t.up_to.is_none_or(|to| q <= to))
                    .expect("the last tier is open");
                q * t.unit_price + t.flat_fee
            };
            let p = price(&Model::Volume { tiers: tiers.clone() }, q).expect("priced");
            prop_assert_eq!(p.amount, expected);
            if let Some(t) = p.tiers.first() {
                prop_assert!(t.from < q);
                prop_assert_eq!(t.from, t.tier.checked_sub(1).and_then(|i| tiers[i].up_to).unwrap_or_default());
            }
        }

        #[test]
        fn single_open_tier_is_per_unit(p in money(), q in quantity()) {
            let per_unit = price(&Model::PerUnit { price: p }, q).expect("per unit").amount;
            let open = vec![Tier { up_to: None, unit_price: p, flat_fee: Decimal::ZERO }];
            let graduated = price(&Model::Graduated { tiers: open.clone() }, q).expect("g").amount;
            let volume = price(&Model::Volume { tiers: open }, q).expect("v").amount;
            prop_assert_eq!(graduated, per_unit);
            prop_assert_eq!(volume, per_unit);
            prop_assert_eq!(per_unit, q * p);
        }

        #[test]
        fn package_is_ceiling_blocks_times_price(
            size in (1i64..1_000_000).prop_map(|n| Decimal::new(n, 3)),
            p in money(),
            q in quantity(),
        ) {
            let priced = price(&Model::Package { size, price: p }, q).expect("priced");
            let blocks = priced.packages.expect("package count");
            prop_assert_eq!(blocks, (q / size).ceil());
            prop_assert!(blocks * size >= q);
            prop_assert!(blocks.is_zero() || (blocks - Decimal::ONE) * size < q);
            prop_assert_eq!(priced.amount, blocks * p);
        }

        #[test]
        fn graduated_never_exceeds_pricing_every_unit_at_the_dearest_tier(
            tiers in tiers(), q in quantity(),
        ) {
            let dearest = tiers.iter().map(|t| t.unit_price).max().unwrap_or_default();
            let fees: Decimal = tiers.iter().map(|t| t.flat_fee).sum();
            let m = Model::Graduated { tiers };
            prop_assert!(price(&m, q).expect("priced").amount <= q * dearest + fees);
        }
    }
}
