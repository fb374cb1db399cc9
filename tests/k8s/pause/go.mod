// The lab kubelet's pod sandbox image (tests/k8s/build.sh --node): no dependencies.
module wiremesh.invalid/pause

go 1.24
