#!/usr/bin/env bash
# Build libfuse from Debian's source package into a prefix of the project's own (run by `make setup`).
#
# Why: Debian 12 ships libfuse 3.14; FUSE passthrough and FUSE_CAP_DIRECT_IO_ALLOW_MMAP need >= 3.17.
# What: Debian's `fuse3` source package, version $LIBFUSE_DEB (pinned, with the sha256 of its files),
# fetched with apt-get from the Debian archive that the machine's own apt configuration names, with
# the suite that carries that version added in a private apt configuration under $OUT/apt (the
# machine's package sources stay as they were), then built with meson and ninja into $OUT/prefix.
# The system's libfuse is never replaced; pyfuse3 and reflinkfs's extensions link the library in the
# prefix (with an rpath), found through $OUT/prefix/lib/pkgconfig.
# Idempotent: a finished build ($OUT/prefix/.built-$LIBFUSE_DEB) is left as it is.
set -euo pipefail

LIBFUSE_DEB=3.17.2-3             # Debian's fuse3 source package version
LIBFUSE_SUITE=trixie             # the suite that carries it
declare -A SHA256=(
  [fuse3_3.17.2.orig.tar.gz]=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
  [fuse3_3.17.2-3.debian.tar.xz]=eaf7a177761ae8bf99ea97619f2cccf83f169b4f000e17b6106834e69456b5a2
  [fuse3_3.17.2-3.dsc]=1339847e7e6512f31d61cf1fe4598341c4b8aa43ea6dc546914b21f96f29deb3
)

OUT=$(realpath -m "${1:-build/libfuse}")
PREFIX=$OUT/prefix
STAMP=$PREFIX/.built-$LIBFUSE_DEB
[ -e "$STAMP" ] && exit 0

die() { echo "build-libfuse: $*" >&2; exit 1; }
for tool in apt-get dpkg-source meson ninja; do
  command -v "$tool" >/dev/null || die "$tool is missing (make setup installs it)"
done

# The Debian archive the machine already uses: the repository that serves its release's main component.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
archive=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 2>/dev/null \
          | awk -v rel="$codename" '$2 == rel && $3 == "main" { print $1; exit }')
[ -n "$archive" ] || die "no Debian archive for '$codename' main in the apt configuration (apt-get indextargets)"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || die "$keyring is missing (Debian package debian-archive-keyring)"

# A private apt configuration: its own sources list, lists and cache, nothing else of the machine's.
apt=$OUT/apt
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/sources.list.d" "$apt/preferences.d" "$OUT/src"
echo "deb-src [signed-by=$keyring] $archive $LIBFUSE_SUITE main" > "$apt/sources.list"
aptopts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o "Dir::Etc::sourceparts=$apt/sources.list.d"
         -o "Dir::Etc::preferencesparts=$apt/preferences.d" -o "Dir::State::lists=$apt/lists"
         -o "Dir::Cache=$apt/cache" -o "APT::Sandbox::User=root" -qq)

cd "$OUT/src"
verified() { for f in "${!SHA256[@]}"; do echo "${SHA256[$f]}  $f"; done | sha256sum --quiet -c - 2>/dev/null; }
if ! verified; then
  echo "build-libfuse: fetching Debian's fuse3 $LIBFUSE_DEB source from $archive ($LIBFUSE_SUITE)"
  apt-get "${aptopts[@]}" update || die "apt-get update of the private source list failed"
  apt-get "${aptopts[@]}" source --download-only "fuse3=$LIBFUSE_DEB" \
    || die "fuse3 $LIBFUSE_DEB is not in $archive $LIBFUSE_SUITE (pin a version that is, with its sha256)"
  verified || die "the fuse3 $LIBFUSE_DEB files do not match their pinned sha256"
fi
upstream=${LIBFUSE_DEB%-*}
rm -rf "fuse3-$upstream"
dpkg-source --no-check -x "fuse3_$LIBFUSE_DEB.dsc" "fuse3-$upstream" >/dev/null   # applies Debian's patches

rm -rf "$OUT/obj" "$PREFIX"
meson setup "$OUT/obj" "fuse3-$upstream" --prefix="$PREFIX" --libdir=lib --buildtype=release \
  -Dexamples=false -Dutils=false -Dtests=false -Duseroot=false \
  -Dinitscriptdir= -Dudevrulesdir="$PREFIX/udev" >"$OUT/meson.log" 2>&1 \
  || { tail -20 "$OUT/meson.log" >&2; die "meson setup failed (log: $OUT/meson.log)"; }
ninja -C "$OUT/obj" install >>"$OUT/meson.log" 2>&1 \
  || { tail -20 "$OUT/meson.log" >&2; die "the build failed (log: $OUT/meson.log)"; }
touch "$STAMP"
echo "build-libfuse: libfuse $upstream installed in $PREFIX"
