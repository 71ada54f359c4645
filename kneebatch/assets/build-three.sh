#!/usr/bin/env bash
# Rebuilds three.bundle.min.js: three.js (MIT, see three.LICENSE) with OrbitControls and GLTFLoader
# as one classic script (global THREE). The report inlines it: module files over file:// are blocked.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
cd "$work"
npm init -y >/dev/null
npm install --silent three@0.187.0 esbuild
cat > entry.js <<'JS'
export * from "three";
export { OrbitControls } from "three/examples/jsm/controls/OrbitControls.js";
export { GLTFLoader } from "three/examples/jsm/loaders/GLTFLoader.js";
JS
npx esbuild entry.js --bundle --format=iife --global-name=THREE --minify --outfile="$here/three.bundle.min.js"
cp node_modules/three/LICENSE "$here/three.LICENSE"
rm -rf "$work"
