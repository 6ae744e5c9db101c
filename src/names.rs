//! Enums named by strings: in flags, requests, job rows, file names and metric labels.
//! Each derives its names once with strum (`EnumString` parses, `IntoStaticStr` names,
//! `VariantNames` lists) and refuses an unknown name with the one message written here.

/// An enum whose variants have one name each (and perhaps aliases that also parse).
pub trait Named: Copy + Into<&'static str> {
    /// The variant's name, as it is parsed, stored and shown.
    fn name(self) -> &'static str {
        self.into()
    }
}

impl<T: Copy + Into<&'static str> + strum::VariantNames> Named for T {}

/// "unknown {what} '{given}' (expected a, b or c)": what `T::from_str` answers to a name
/// it does not know.
pub fn unknown<T: strum::VariantNames>(what: &str, given: &str) -> String {
    let expected = match T::VARIANTS {
        [] => String::new(),
        [one] => (*one).to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    };
    format!("unknown {what} '{given}' (expected {expected})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use crate::engine::data::DatasetFormat;
    use crate::engine::model::{Precision, Readout};
    use crate::engine::train::Preset;
    use crate::store::JobState;
    use strum::{IntoEnumIterator, VariantNames};

    /// Every variant's name parses back to it, and the names are the documented ones.
    fn round_trips<T>(names: &[&str])
    where
        T: Named + IntoEnumIterator + VariantNames + std::fmt::Display,
        T: std::str::FromStr<Err = String> + PartialEq + std::fmt::Debug,
    {
        assert_eq!(T::VARIANTS, names);
        assert_eq!(T::iter().count(), names.len());
        for v in T::iter() {
            assert_eq!(v.name().parse::<T>().unwrap(), v);
            assert_eq!(v.to_string(), v.name());
        }
    }

    #[test]
    fn every_named_enum_round_trips_its_documented_names() {
        round_trips::<Preset>(&["reference", "cpu-small", "tiny"]);
        round_trips::<Precision>(&["f32", "bf16"]);
        round_trips::<Readout>(&["last-fast", "slow"]);
        round_trips::<DatasetFormat>(&["cifar10", "cifar100", "image-folder"]);
        round_trips::<JobState>(&[
            "QUEUED",
            "RUNNING",
            "SUCCEEDED",
            "FAILED",
            "CANCELLED",
            "PAUSED",
            "STOPPED",
        ]);
        round_trips::<Role>(&["admin", "train", "infer"]);
    }

    #[test]
    fn aliases_parse_and_unknown_names_list_the_known_ones() {
        for (alias, want) in [
            ("cifar-10", DatasetFormat::Cifar10),
            ("cifar-100", DatasetFormat::Cifar100),
            ("imagefolder", DatasetFormat::ImageFolder),
        ] {
            assert_eq!(alias.parse::<DatasetFormat>().unwrap(), want);
        }
        assert_eq!(
            "huge".parse::<Preset>().unwrap_err(),
            "unknown preset 'huge' (expected reference, cpu-small or tiny)"
        );
        assert_eq!(
            "f16".parse::<Precision>().unwrap_err(),
            "unknown precision 'f16' (expected f32 or bf16)"
        );
        // Names are exact: another case is another name.
        assert!("Tiny".parse::<Preset>().is_err());
        assert!("queued".parse::<JobState>().is_err());
        assert_eq!(
            unknown::<Role>("role", ""),
            "unknown role '' (expected admin, train or infer)"
        );
    }
}
