"""Whether a ``-cpu host`` guest may move live between two hosts' CPUs."""

from __future__ import annotations

from corral.model import HostCpu, cpu_gap

INTEL = HostCpu(vendor="GenuineIntel", model="Xeon A", features=["avx2", "sse4.2", "vmx"])


def test_the_same_cpu_fits() -> None:
    assert cpu_gap(INTEL, INTEL.model_copy()) is None


def test_a_target_with_more_features_fits() -> None:
    bigger = INTEL.model_copy(update={"features": [*INTEL.features, "avx512f"]})
    assert cpu_gap(INTEL, bigger) is None


def test_a_target_missing_a_feature_is_refused_naming_it() -> None:
    smaller = INTEL.model_copy(update={"model": "Xeon B", "features": ["sse4.2", "vmx"]})
    gap = cpu_gap(INTEL, smaller)
    assert gap is not None and "avx2" in gap and "Xeon B" in gap


def test_many_missing_features_are_summed_up() -> None:
    rich = INTEL.model_copy(update={"features": [f"f{i:02}" for i in range(20)]})
    gap = cpu_gap(rich, INTEL)
    assert gap is not None and "and 12 more" in gap and "f00" in gap


def test_another_vendor_is_refused() -> None:
    amd = HostCpu(vendor="AuthenticAMD", model="EPYC", features=[*INTEL.features, "svm"])
    gap = cpu_gap(INTEL, amd)
    assert gap is not None and "AuthenticAMD" in gap


def test_a_host_without_kvm_is_refused() -> None:
    assert "without KVM" in str(cpu_gap(INTEL, None))
    assert "source host did not report" in str(cpu_gap(None, INTEL))
